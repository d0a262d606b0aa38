"""How long should the weight average be? The final EMA of a run against its mean with an earlier EMA snapshot.

    python diffusion_utilities.py train --out runs/ship30 --steps 5600 --terminal-signal 0.004 \
        --snapshots 250 1000 4000 --seed 0 --threads 2       # 25-45 min, pace varies
    python -m research.ema_length --run runs/ship30          # about 10 minutes on 2 CPU cores

    python diffusion_utilities.py train --out runs/ship30d --steps 5600 --terminal-signal 0.004 --seed 0 \
        --threads 2 --snapshots 250 1000 2000 2400 2800 3200 3600 4000 4400 4800 5200   # the same run, more
                                                                                 # snapshots: the shipped model's
    python -m research.ema_length --run runs/ship30d --seeds 0 --no-batchnorm-variant --out F.json \
        --steps 4000 --steps 4400 4800 5200 --steps 4000 4400 4800 5200   # longer means (ema_length_dense.json)

EMA's decay ramps as min(decay, (1 + n) / (ema_warmup + n)); with ema_warmup 10 the ramp, not the decay,
is what binds for the first ~9,000 steps (ramp = 0.999 at n = 8,991), so at the end of a 5,600-step run
the average covers roughly the last ninth of training (decay 0.9984, not 0.999). This compares, on the
same run:

    final EMA                     what `train` writes (ema.pt)
    mean with snapshot(s)         the final EMA's parameters averaged with the EMA snapshots at --steps
                                  (what `export --average-snapshots` ships); BatchNorm statistics the final ones
    ... statistics averaged too   the same with BatchNorm's running statistics averaged as well

Each is scored with sprite-FID (n = 1000) for DDIM-25 eta 0 and DDIM-50 eta 1: on the real sets and noise
seed `evaluate` uses (seed 0), and on other real sets and noise (seed 1) as a held-out check.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import diffusion_utilities as du
from course_tools.cli import average_with_snapshots
from course_tools.hardware import describe_device, fast_settings
from course_tools.metrics import classifier_outputs, frechet_distance, generate, load_classifier, real_sets

ROOT = Path(__file__).resolve().parents[1]


def variants(run, groups, *, batchnorm=True):
    """(name, model) for the final EMA and its averages with each group of snapshot steps (and, for the
    first group, the same with BatchNorm statistics averaged too, unless batchnorm is False)."""
    final = du.load_model(run / "ema.pt", "cpu")
    state = final.state_dict()
    params = {name for name, _ in final.named_parameters()}
    floats = {k for k, v in state.items() if v.is_floating_point()}  # the parameters and BatchNorm statistics
    todo = [("final EMA", state)]
    for i, steps in enumerate(groups):
        todo.append((f"mean with snapshot(s) {steps}", average_with_snapshots(state, run, steps, keys=params)))
        if i == 0 and batchnorm:
            todo.append((f"mean with snapshot(s) {steps}, BatchNorm statistics averaged too",
                         average_with_snapshots(state, run, steps, keys=floats)))
    for name, weights in todo:
        model = copy.deepcopy(final)
        model.load_state_dict(weights)
        yield name, model.eval()


def fid_row(model, classifier, ref, mix, seed, amp_dtype):
    """Sprite-FID of DDIM-25 eta 0 and DDIM-50 eta 1 (w = 0) for samples of the class mix, against ref."""
    row = {}
    for k, eta in [(25, 0.0), (50, 1.0)]:
        x, _ = generate(model, du.model_schedule(model), mix, "ddim", k, eta, 0.0, seed, amp_dtype=amp_dtype,
                        progress=False)
        row[f"DDIM-{k} eta {eta:g}"] = round(float(frechet_distance(classifier_outputs(classifier, x)[0], ref)), 3)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/ship30", help="a finished run with ema.pt and snap_<step>.pt files")
    ap.add_argument("--steps", type=int, nargs="+", action="append", default=None,
                    help="snapshot steps to average with (default 4000); repeat the option to compare several sets")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="0: evaluate's sets and noise; others held out")
    ap.add_argument("--no-batchnorm-variant", action="store_true",
                    help="skip the variant that averages BatchNorm statistics too")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "research" / "ema_length.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = Path(args.run)
    cfg = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["config"]
    n_end = cfg["steps"]
    images, labels, _ = du.load_sprites()
    classifier = load_classifier("cpu")
    amp = fast_settings("cpu")[0]
    sets = {seed: real_sets(classifier, images, labels, args.n, seed) for seed in args.seeds}
    res = {"command": "python -m research.ema_length " + " ".join(sys.argv[1:] if argv is None else argv),
           "n": args.n, "run_steps": n_end, "hardware": describe_device("cpu"),
           "ema_decay_at_end": round(min(cfg["ema_decay"], (1 + n_end) / (cfg["ema_warmup"] + n_end)), 5),
           "rows": []}
    for name, model in variants(run, args.steps or [[4000]], batchnorm=not args.no_batchnorm_variant):
        for seed, (ref, _, mix) in sets.items():
            row = {"weights": name, "seed": seed, **fid_row(model, classifier, ref, mix, seed, amp)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
