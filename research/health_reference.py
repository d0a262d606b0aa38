"""The reference band behind notebook 3's "Is my run healthy?": the notebook's recipe, healthy and broken.

    python -m research.health_reference --seeds 0 1 --steps 150 420

Each healthy run is notebook 3's training cell (course_tools.health's recipe: n_feat 32, v-prediction,
Min-SNR-5, lr 2e-3, batch 128, every class equally often, notebook 1's schedule) for the shortest (150) and
the longest (420) run the notebook plans, per seed. Each is measured with course_tools.health.loss_by_noise_level
(the training loss on fixed real sprites, per band of t). The band is the lowest and highest value per band over
the healthy runs, widened by --margin (so a new seed does not fall out by chance); start_high is the highest
loss of a healthy run's first 10 steps. Broken runs (150 steps, seed 0) record what the two most common
mistakes look like: a learning rate 250x too high (25x still trains: it is recorded as 'tolerated'), and sprites
left in [0, 1] or [0, 255]. Everything goes to research/health_reference.json, which course_tools.health reads;
--reuse-healthy keeps that file's healthy runs and re-runs only the broken ones. Run it alone: other torch work
slows training.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import numpy as np
import torch

import diffusion_utilities as du
from course_tools.hardware import describe_device, use_fast_settings
from course_tools.health import REFERENCE, buckets, loss_by_noise_level, nan_safe

BROKEN = {"lr 0.5": dict(lr=0.5), "data in [0, 1]": dict(scale="0..1"), "data in [0, 255]": dict(scale="0..255")}
TOLERATED = {"lr 5e-2": dict(lr=5e-2)}  # 25x the recipe's rate: Adam, warm-up and the cosine decay absorb it


def rescaled(batches, scale):
    """The batches with sprites moved from [-1, 1] to another range: the mistake a learner makes."""
    for x, c in batches:
        yield ((x + 1) / 2 if scale == "0..1" else (x + 1) * 127.5), c


def notebook_run(images, labels, *, steps, seed, lr=2e-3, scale=None, fp32=False, terminal_signal=None):
    """Notebook 3's training cell for `steps` steps: (the EMA model, its schedule, every step's loss, seconds).
    terminal_signal: train on that schedule instead of notebook 1's (research/flow_pilot.py compares both)."""
    schedule = du.make_schedule(500, terminal_signal=terminal_signal)
    torch.manual_seed(seed)
    model = du.ContextUnet(n_feat=32, prediction="v")
    if not fp32:
        use_fast_settings(model, "cpu")
    gen = torch.Generator().manual_seed(seed)
    batches = du.sprite_batches(images, labels, batch_size=128, class_balance=0.0, generator=gen)
    if scale is not None:
        batches = rescaled(batches, scale)
    start = time.perf_counter()
    ema, history = du.train(model, batches, schedule, steps=steps, warmup=min(50, steps // 5), progress=False,
                            lr=lr, snr_gamma=5.0, generator=gen)
    return ema.model, schedule, history, time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[150, 420])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--margin", type=float, default=0.15, help="widen the band by this fraction on each side")
    ap.add_argument("--fp32", action="store_true", help="train in fp32, as on a CPU without native bf16")
    ap.add_argument("--reuse-healthy", action="store_true", help="keep the recorded healthy runs, redo the broken")
    args = ap.parse_args(argv)
    images, labels, _ = du.load_sprites()
    runs = json.loads(REFERENCE.read_text())["runs"] if args.reuse_healthy else []
    for steps in ([] if args.reuse_healthy else args.steps):
        for seed in args.seeds:
            model, schedule, history, seconds = notebook_run(images, labels, steps=steps, seed=seed, fp32=args.fp32)
            runs.append({"steps": steps, "seed": seed, "seconds": round(seconds, 1),
                         "start": float(np.mean(history[:10])), "end": float(np.mean(history[-10:])),
                         "losses": loss_by_noise_level(model, schedule).tolist()})
            print(json.dumps(runs[-1]), flush=True)
    broken, tolerated = {}, {}
    for name, options in {**BROKEN, **TOLERATED}.items():
        model, schedule, history, _ = notebook_run(images, labels, steps=150, seed=0, fp32=args.fp32, **options)
        row = {"steps": 150, "seed": 0, **options, "first": nan_safe([history[0]])[0],
               "start": nan_safe([np.mean(history[:10])])[0], "end": nan_safe([np.mean(history[-10:])])[0],
               "losses": nan_safe(loss_by_noise_level(model, schedule))}
        (broken if name in BROKEN else tolerated)[name] = row
        print(name, json.dumps(row), flush=True)
    table = np.array([r["losses"] for r in runs])
    band = {"buckets": buckets(500), "low": (table.min(0) * (1 - args.margin)).tolist(),
            "high": (table.max(0) * (1 + args.margin)).tolist(),
            "start_low": min(r["start"] for r in runs) * (1 - args.margin),
            "start_high": max(r["start"] for r in runs) * (1 + args.margin)}
    command = "python -m research.health_reference " + shlex.join(sys.argv[1:] if argv is None else argv)
    before = json.loads(REFERENCE.read_text()).get("commands", []) if args.reuse_healthy else []
    out = {"commands": before + [command.strip()],
           "hardware": describe_device("cpu"), "precision": "fp32" if args.fp32 else "as use_fast_settings picks",
           "margin": args.margin, "band": band, "runs": runs, "broken": broken, "tolerated": tolerated}
    REFERENCE.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", REFERENCE)


if __name__ == "__main__":
    main()
