"""Which training recipe reaches good sprites fastest? Every candidate gets the same wall-clock budget.

    python -m research.training_recipes --minutes 1.5            # the study (about 40 min on 2 cores)
    python -m research.training_recipes --minutes 1.5 --only base v-pred
    python -m research.training_recipes --list
    python -m research.training_recipes --steps 600 --only base v-prediction --out OTHER.json  # same steps for all

Each candidate is the base recipe with one change (or, in the "combined" rows, the winners together).
A candidate first times 20 training steps, plans the number of steps that fits the budget (so its
learning-rate schedule runs to the end), trains them with course_tools.training.run_training (the trainer
of `python diffusion_utilities.py train`), and is then scored:

- guided accuracy: DDIM-25, eta 0, guidance w = 2, 40 samples per class, judged by the project's
  SpriteClassifier (weights/classifier.pt): the share recognised as the class asked for, per class;
- sprite-FID: DDIM-25, eta 0, w = 0, 500 samples with the real class mix, against 500 real sprites, on the
  classifier's features (the real-vs-real floor at the same n is printed beside it).

Writes research/training_recipes.json (every number, the command, the machine) and prints a markdown
table. Run it alone: on a 2-core CPU any other torch work slows training several-fold.
With --cpu-rates FILE the steps are planned from the samples/s that an earlier run of this script
measured on the CPU (FILE is its JSON): a GPU then replays "what N CPU-minutes would give" in seconds.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import course_tools.metrics as cm
import diffusion_utilities as du
from course_tools.hardware import describe_device, fast_settings
from course_tools.training import TrainConfig, run_training

ROOT = Path(__file__).resolve().parents[1]

# The base of the single-change study: the best short recipe known when the study began.
# Every loss setting is pinned here: TrainConfig's defaults are the study's outcome, not its starting point.
BASE = dict(n_feat=32, batch_size=128, lr=2e-3, warmup=50, ema_decay=0.995, ema_warmup=10, prediction="eps",
            snr_gamma=None, class_balance=0.5, norm="batch", zero_init=False, t_sampling="uniform",
            input_perturbation=0.0)

CANDIDATES = {
    # what notebook 3 ran before this study (n_feat 64, batch 64, EMA 0.99)
    "notebook-3 before": dict(n_feat=64, batch_size=64, lr=2e-3, warmup=50, ema_decay=0.99),
    "base": {},
    # model width
    "n_feat 48": dict(n_feat=48),
    "n_feat 64": dict(n_feat=64),
    # batch size
    "batch 64": dict(batch_size=64),
    "batch 256": dict(batch_size=256),
    # learning rate and warm-up
    "lr 1e-3": dict(lr=1e-3),
    "lr 4e-3": dict(lr=4e-3),
    "warm-up 200": dict(warmup=200),
    # EMA decay and EMA warm-up
    "EMA 0.99": dict(ema_decay=0.99),
    "EMA 0.999": dict(ema_decay=0.999),
    "no EMA": dict(ema_decay=0.0),
    "EMA warm-up 100": dict(ema_warmup=100),
    # the loss: weighting, target, which t, perturbation
    "min-SNR-5": dict(snr_gamma=5.0),
    "v-prediction": dict(prediction="v"),
    "t log-normal": dict(t_sampling="lognormal"),
    "input perturbation 0.1": dict(input_perturbation=0.1),
    # the network
    "GroupNorm": dict(norm="group"),
    "zero-init output": dict(zero_init=True),
    # the data: draw classes equally (food has only 48 sprites)
    "classes balanced": dict(class_balance=0.0),
}

# Round two: the changes that won round one, together.
COMBINED = {
    "v + min-SNR": dict(prediction="v", snr_gamma=5.0),
    "v + min-SNR + balanced": dict(prediction="v", snr_gamma=5.0, class_balance=0.0),
    "v + min-SNR + balanced, batch 64": dict(prediction="v", snr_gamma=5.0, class_balance=0.0, batch_size=64),
    "v + min-SNR + balanced, EMA 0.999": dict(prediction="v", snr_gamma=5.0, class_balance=0.0, ema_decay=0.999),
}

# Candidates for the shipped model's 30-minute run (full settings; replayed on a GPU by gpu_replay.sh).
_NEW = dict(prediction="v", snr_gamma=5.0, warmup=200, ema_decay=0.999)
SHIP = {
    "ship: old recipe n_feat 64": dict(n_feat=64, batch_size=100, lr=1e-3, warmup=200, ema_decay=0.999,
                                       class_balance=0.5),
    "ship: new n_feat 32": dict(n_feat=32, lr=2e-3, class_balance=0.5, **_NEW),
    "ship: new n_feat 48": dict(n_feat=48, lr=2e-3, class_balance=0.5, **_NEW),
    "ship: new n_feat 64": dict(n_feat=64, lr=1e-3, class_balance=0.5, **_NEW),
    "ship: new n_feat 64 lr 2e-3": dict(n_feat=64, lr=2e-3, class_balance=0.5, **_NEW),
    "ship: new n_feat 64 balanced": dict(n_feat=64, lr=1e-3, class_balance=0.0, **_NEW),
    "ship: new n_feat 48 batch 64": dict(n_feat=48, lr=2e-3, batch_size=64, class_balance=0.5, **_NEW),
}


def config_for(overrides, steps):
    settings = {**BASE, **overrides}
    settings["warmup"] = min(settings["warmup"], max(1, steps // 5))
    return TrainConfig(steps=steps, checkpoint_every=10**9, **settings)


def time_steps(overrides, device, n=20):
    """Seconds per training step of this recipe, timed over n steps after 5 warm-up steps."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = []
        run_training(config_for(overrides, n + 5), tmp, device=device, progress=False,
                     callback=lambda step, loss: t0.append(time.perf_counter()) if step in (5, n + 5) else None)
    return (t0[1] - t0[0]) / n


@torch.no_grad()
def score(model, classifier, real_ref, labels_mix, *, per_class=40, n_fid=500, seed=0, amp_dtype=None):
    """Guided per-class accuracy (w = 2) and sprite-FID (w = 0), both DDIM-25 eta 0."""
    schedule = du.model_schedule(model)  # the one it was trained with (the course's 500-step linear by default)
    names = du.load_sprites()[2]  # the classifier's classes, named by the data file
    classes = np.repeat(np.arange(len(names)), per_class)
    x, _ = cm.generate(model, schedule, classes, "ddim", 25, 0.0, 2.0, seed, amp_dtype=amp_dtype, progress=False)
    _, pred = cm.classifier_outputs(classifier, x)
    per = {name: float((pred[classes == c] == c).mean()) for c, name in enumerate(names)}
    x, _ = cm.generate(model, schedule, labels_mix[:n_fid], "ddim", 25, 0.0, 0.0, seed + 1, amp_dtype=amp_dtype,
                       progress=False)
    feats, _ = cm.classifier_outputs(classifier, x)
    return {"guided_accuracy": float(np.mean(list(per.values()))), "per_class": per,
            "fid": cm.frechet_distance(feats, real_ref)}


def run(name, overrides, seconds, device, classifier, real, steps=None):
    """Train one candidate for the budget (or for `steps`) and score it. Returns its row."""
    sec_per_step = time_steps(overrides, device)
    if steps is None:
        steps = max(10, int(seconds / sec_per_step))
    cfg = config_for(overrides, steps)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.time()
        history = run_training(cfg, run_dir, device=device, progress=False)
        train_s = time.time() - t0
        model = du.load_model(Path(run_dir) / "ema.pt", device)
    amp_dtype = fast_settings(device)[0]
    return {"name": name, "changes": overrides, "config": cfg.__dict__, "steps": steps,
            "seconds_per_step_timed": sec_per_step, "train_seconds": train_s,
            "samples_per_second": steps * cfg.batch_size / train_s,
            "final_loss": float(np.mean(history[-50:])), **score(model, classifier, real["ref"], real["mix"],
                                                                amp_dtype=amp_dtype)}


def markdown(rows, floor, budget_min):
    names = list(rows[0]["per_class"]) if rows else []
    lines = [f"| recipe | steps | samples/s | train s | guided acc. | {' | '.join(names)} | "
             f"sprite-FID (floor {floor:.2f}) |", "|---" * (6 + len(names)) + "|"]
    for r in rows:
        pc = r["per_class"]
        lines.append(f"| {r['name']} | {r['steps']} | {r['samples_per_second']:.0f} | {r['train_seconds']:.0f} | "
                     f"**{r['guided_accuracy']:.0%}** | " + " | ".join(f"{pc[c]:.0%}" for c in names)
                     + f" | {r['fid']:.2f} |")
    return f"Budget {budget_min:g} min per recipe.\n\n" + "\n".join(lines)


def real_features(classifier, device, n=500, seed=0):
    """The real sprites every recipe is scored against (course_tools.metrics.real_sets) and the floor."""
    images, labels, _ = du.load_sprites()
    f_ref, f_other, mix = cm.real_sets(classifier, images, labels, n, seed)
    return {"ref": f_ref, "mix": mix, "floor": cm.frechet_distance(f_other, f_ref)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.5, help="training budget per recipe")
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to run (default: all of round one)")
    ap.add_argument("--combined", action="store_true", help="run round two (the combined recipes) too")
    ap.add_argument("--list", action="store_true", help="list the recipes and exit")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help="train every recipe for this many steps instead of a time budget (a controlled comparison)")
    ap.add_argument("--cpu-rates", default=None, help="plan steps from the CPU samples/s in this JSON")
    ap.add_argument("--rates-only", action="store_true",
                    help="only time each recipe's training step and write {name: samples/s} to --out")
    ap.add_argument("--out", default=str(ROOT / "research" / "training_recipes.json"))
    args = ap.parse_args(argv)
    every = {**CANDIDATES, **COMBINED, **SHIP}
    if args.list:
        for name, ov in every.items():
            print(f"{name:24s} {ov}")
        return
    names = args.only if args.only is not None else list(CANDIDATES) + (list(COMBINED) if args.combined else [])
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; see --list")
    out = Path(args.out)
    if out.suffix != ".json":
        raise SystemExit(f"--out must be a .json file, got {out}")
    device = du.get_device(args.device)
    if args.rates_only:
        rates = {name: {**BASE, **every[name]}["batch_size"] / time_steps(every[name], device, n=40) for name in names}
        out.write_text(json.dumps({"hardware": describe_device(device), "samples_per_second": rates}, indent=1))
        print(json.dumps(rates, indent=1))
        return
    rates = {}
    if args.cpu_rates:
        for path in args.cpu_rates.split(","):
            saved = json.loads(Path(path).read_text())
            rates.update(saved.get("samples_per_second", {}))
            rates.update({r["name"]: r["samples_per_second"] for r in saved.get("rows", [])})
    classifier = cm.load_classifier(device)
    real = real_features(classifier, device)
    previous = json.loads(out.read_text()) if out.exists() else {}
    rows = [r for r in previous.get("rows", []) if r["name"] not in names]
    command = shlex.join(["python", "-m", "research.training_recipes", *(sys.argv[1:] if argv is None else argv)])
    for name in names:
        steps = args.steps
        if args.cpu_rates:
            batch = {**BASE, **every[name]}["batch_size"]
            steps = int(args.minutes * 60 * rates[name] / batch)
        row = run(name, every[name], args.minutes * 60, device, classifier, real, steps=steps)
        rows.append(row)
        print(f"{name:24s} {row['steps']:5d} steps {row['train_seconds']:5.0f} s  guided {row['guided_accuracy']:.0%}"
              f"  {row['per_class']}  FID {row['fid']:.2f}", flush=True)
        commands = list(dict.fromkeys(previous.get("commands", []) + [command]))
        budget = {"steps": args.steps} if args.steps else {"minutes": args.minutes}
        out.write_text(json.dumps({"commands": commands, **budget, "hardware": describe_device(device),
                                   "fid_floor": real["floor"], "rows": rows}, indent=1))
    print(markdown(rows, real["floor"], args.minutes))


if __name__ == "__main__":
    main()
