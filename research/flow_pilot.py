"""A pilot for notebook 8 (issue 24): flow matching against diffusion in notebook 3's wait, at 5, 10 and 25 calls.

    python -m research.flow_pilot --steps 420 --seed 0

Four runs of notebook 3's recipe, the same network (n_feat 32), batches, optimiser, learning-rate schedule and
moving average, for the same number of steps (so the same wall-clock: the objective costs nothing extra):
- diffusion: notebook 3's loss (v target, Min-SNR-5, notebook 1's schedule), sampled with deterministic DDIM;
- the same with the shipped model's schedule (terminal signal 0.004: x_T holds almost none of the sprite);
- flow, uniform s: rectified flow / flow matching, x_s = (1 - s) x0 + s eps with s ~ U(0, 1), the network given
  s and trained on the velocity u = eps - x0 (plain MSE), sampled with Euler's method from s = 1 to 0;
- flow, logit-normal s: the same with s = sigmoid(N(0, 1)), the time sampling SD3 found best (Esser et al. 2024).
Each is judged as notebook 3 judges: guided (w = 2) accuracy on 200 samples (40 per class), and sprite-FID of
unguided samples at n = 500 against real sprites (floor 1.15 at this n), at 5, 10 and 25 network calls.
The flow loss and the Euler sampler are the module's (du.flow_loss, du.sample_flow), which notebook 8 teaches.
Run it alone: other torch work slows training. Writes research/flow_pilot.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffusion_utilities as du
from course_tools.hardware import describe_device, use_fast_settings
from course_tools.metrics import classifier_outputs, frechet_distance, load_classifier, real_sets
from research.health_reference import notebook_run

OUT = du.ROOT / "research" / "flow_pilot.json"
CALLS = (5, 10, 25)


def train_flow(images, labels, *, steps, seed, time_sampling, lr=2e-3):
    """Notebook 3's run (health_reference.notebook_run's network, batches, optimiser and schedule) with the flow
    loss instead: du.train with loss_fn=du.flow_loss. Returns (the EMA model, every step's loss, seconds)."""
    torch.manual_seed(seed)
    model = du.ContextUnet(n_feat=32, prediction="u")
    use_fast_settings(model, "cpu")
    gen = torch.Generator().manual_seed(seed)
    batches = du.sprite_batches(images, labels, batch_size=128, class_balance=0.0, generator=gen)
    start = time.perf_counter()
    ema, history = du.train(model, batches, None, steps=steps, warmup=min(50, steps // 5), progress=False, lr=lr,
                            loss_fn=du.flow_loss, time_sampling=time_sampling, generator=gen)
    return ema.model, history, time.perf_counter() - start


def sample_flow(model, classes, *, n_steps, guide_w, seed):
    """Euler's method on the learned velocity, from pure noise at s = 1 to s = 0, with guidance (du.sample_flow)."""
    return du.sample_flow(model, len(classes), n_steps=n_steps, context=torch.as_tensor(classes), guide_w=guide_w,
                          generator=torch.Generator().manual_seed(seed))[0]


def judge(sample, classifier, real_ref, real_labels, n_classes):
    """Notebook 3's guided accuracy (200 samples, w = 2) and unguided sprite-FID at n = len(real_labels)."""
    asked = np.repeat(np.arange(n_classes), 40)
    _, pred = classifier_outputs(classifier, sample(asked, guide_w=2.0, seed=1))
    accuracy = float(np.mean([(pred[asked == k] == k).mean() for k in range(n_classes)]))
    features, _ = classifier_outputs(classifier, sample(real_labels, guide_w=0.0, seed=0))
    return {"guided_accuracy": accuracy, "fid": frechet_distance(features, real_ref)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=420)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=500, help="samples for the FID (and real sprites in each set)")
    ap.add_argument("--out", type=Path, default=OUT, help="where the rows go (default research/flow_pilot.json)")
    args = ap.parse_args(argv)
    images, labels, names = du.load_sprites()
    classifier = load_classifier("cpu")
    real_ref, real_other, real_labels = real_sets(classifier, images, labels, args.n, seed=0)
    rows = [{"run": "floor", "fid": frechet_distance(real_other, real_ref)}]

    for terminal_signal, label in [(None, "diffusion (v, Min-SNR-5), DDIM"),  # notebook 3's run exactly
                                   (0.004, "diffusion (v, Min-SNR-5, terminal signal 0.004), DDIM")]:  # the shipped schedule
        model, schedule, history, seconds = notebook_run(images, labels, steps=args.steps, seed=args.seed,
                                                         terminal_signal=terminal_signal)
        for calls in CALLS:
            def sample(classes, guide_w, seed, calls=calls):
                return du.sample_ddim(model, len(classes), schedule, n_steps=calls, context=torch.as_tensor(classes),
                                      guide_w=guide_w, generator=torch.Generator().manual_seed(seed))[0]
            rows.append({"run": label, "calls": calls, "train_seconds": round(seconds, 1),
                         "final_loss": float(np.mean(history[-10:])),
                         **judge(sample, classifier, real_ref, real_labels, len(names))})
            print(json.dumps(rows[-1]), flush=True)
    for time_sampling in ("uniform", "logit-normal"):
        model, history, seconds = train_flow(images, labels, steps=args.steps, seed=args.seed,
                                             time_sampling=time_sampling)
        for calls in CALLS:
            def sample(classes, guide_w, seed, calls=calls):
                return sample_flow(model, classes, n_steps=calls, guide_w=guide_w, seed=seed)
            rows.append({"run": f"flow, {time_sampling} s, Euler", "calls": calls, "train_seconds": round(seconds, 1),
                         "final_loss": float(np.mean(history[-10:])),
                         **judge(sample, classifier, real_ref, real_labels, len(names))})
            print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python -m research.flow_pilot " + shlex.join(sys.argv[1:] if argv is None else argv),
           "hardware": describe_device("cpu"), "steps": args.steps, "seed": args.seed, "n": args.n, "rows": rows}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
