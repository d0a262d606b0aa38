"""What a learner's run in notebook 3 gives on a slower CPU: the notebook's recipe at several step counts.

    python -m research.notebook3_wait --fp32 --steps 120 180 240 300 420 --seeds 0 1

Notebook 3 plans its training to fit a wait (course_tools.training.plan_steps), so a CPU without native bf16
trains fewer steps than one with it. Each row runs the notebook's training cell for that many steps (its
learning-rate schedule run to the end: du.train on du.sprite_batches, after the same 10 probe steps of
plan_steps, which draw from the same batches and generator) and scores it exactly as the notebook does: 200
guided samples (DDIM-25, w = 2, 40 per class, seed 1) from the moving average, judged by the project's
classifier. --fp32 trains (and samples) as a CPU without native bf16 does: fp32, NCHW. Rows are merged into
research/notebook3_wait.json (a row with the same steps, seed and precision is replaced). Run it alone: other
torch work slows training several-fold.
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
from course_tools.metrics import classifier_outputs, load_classifier
from course_tools.training import plan_steps

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "research" / "notebook3_wait.json"


def notebook_run(images, labels, steps, seed, *, fp32=False, device="cpu"):
    """Notebook 3's training cell, for exactly `steps` steps: (the EMA model, its schedule, training seconds)."""
    schedule = du.make_schedule(500)
    torch.manual_seed(seed)
    model = du.ContextUnet(n_feat=32, prediction="v").to(device)
    if not fp32:  # fp32 and NCHW is what use_fast_settings gives on a CPU without native bf16
        use_fast_settings(model, device)
    gen = torch.Generator().manual_seed(seed)
    batches = du.sprite_batches(images, labels, batch_size=128, class_balance=0.0, generator=gen, device=device)
    recipe = dict(lr=2e-3, snr_gamma=5.0, generator=gen)
    # the notebook's probe (min_steps = max_steps = steps: it plans nothing here, but draws what the notebook's does)
    planned, _ = plan_steps(1.0, model=model, batches=batches, schedule=schedule, max_steps=steps, min_steps=steps,
                            **recipe)
    assert planned == steps
    start = time.perf_counter()
    ema, _ = du.train(model, batches, schedule, steps=steps, warmup=min(50, steps // 5), progress=False, **recipe)
    return ema.model, schedule, time.perf_counter() - start


def accuracy(model, schedule, classifier, names):
    """Notebook 3's score: the share of 200 guided samples recognised as the class asked for (mean per class)."""
    asked = torch.arange(len(names)).repeat_interleave(40)
    judged, _ = du.sample_ddim(model, len(asked), schedule, n_steps=25, context=asked, guide_w=2.0,
                               generator=torch.Generator().manual_seed(1))
    _, pred = classifier_outputs(classifier, judged)
    return float(np.mean([(pred[asked.numpy() == k] == k).mean() for k in range(len(names))]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[120, 180, 240, 300, 420])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--fp32", action="store_true", help="train in fp32, as on a CPU without native bf16")
    args = ap.parse_args(argv)
    images, labels, names = du.load_sprites()
    classifier = load_classifier("cpu")
    rows = []
    for steps in args.steps:
        for seed in args.seeds:
            model, schedule, seconds = notebook_run(images, labels, steps, seed, fp32=args.fp32)
            row = {"steps": steps, "seed": seed, "fp32": args.fp32, "train_seconds": round(seconds, 1),
                   "guided_accuracy": accuracy(model, schedule, classifier, names), "hardware": describe_device("cpu")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    old = json.loads(OUT.read_text()) if OUT.exists() else {"commands": [], "rows": []}
    key = lambda r: (r["steps"], r["seed"], r["fp32"])  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = sorted([r for r in old["rows"] if key(r) not in new_keys] + rows, key=key)
    command = shlex.join(["python", "-m", "research.notebook3_wait", *(argv if argv is not None else sys.argv[1:])])
    OUT.write_text(json.dumps({"commands": old["commands"] + [command], "rows": merged}, indent=1) + "\n")


if __name__ == "__main__":
    main()
