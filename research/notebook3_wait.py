"""What a learner's run in notebook 3 gives on a slower CPU: the notebook's recipe at several step counts.

    python research/notebook3_wait.py --fp32 --steps 120 180 240 300 420 --seeds 0 1

Notebook 3 plans its training to fit a wait (du.plan_steps), so a CPU without native bf16 trains fewer
steps than one with it. Each row trains the notebook's recipe for that many steps (its learning-rate
schedule run to the end) and scores it exactly as the notebook does: 200 guided samples (DDIM-25, w = 2,
40 per class, seed 1), judged by the project's classifier. --fp32 trains as a CPU without native bf16
does. Rows are merged into research/notebook3_wait.json (a row with the same steps, seed and precision
is replaced). Run it alone: other torch work slows training several-fold.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import diffusion_utilities as du  # noqa: E402
from course_tools.metrics import classifier_outputs  # noqa: E402
from course_tools.runs import describe_device  # noqa: E402

OUT = ROOT / "research" / "notebook3_wait.json"


def notebook_config(steps, seed):
    """Notebook 3's recipe (its training cell), for `steps` steps."""
    return du.TrainConfig(steps=steps, n_feat=32, batch_size=128, lr=2e-3, warmup=min(50, steps // 5),
                          ema_decay=0.999, prediction="v", snr_gamma=5.0, class_balance=0.0,
                          seed=seed, checkpoint_every=steps)


def accuracy(model, classifier, names):
    """Notebook 3's score: the share of 200 guided samples recognised as the class asked for (mean per class)."""
    asked = torch.arange(len(names)).repeat_interleave(40)
    judged, _ = du.sample_ddim(model, len(asked), du.model_schedule(model), n_steps=25, context=asked, guide_w=2.0,
                               generator=torch.Generator().manual_seed(1))
    _, pred = classifier_outputs(classifier, judged)
    return float(np.mean([(pred[asked.numpy() == k] == k).mean() for k in range(len(names))]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[120, 180, 240, 300, 420])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--fp32", action="store_true", help="train in fp32, as on a CPU without native bf16")
    args = ap.parse_args(argv)
    if args.fp32:
        du.cpu_supports_bf16 = lambda: False  # fast_settings reads it: fp32, contiguous, as on most laptops
    names = du.load_sprites()[2]
    classifier = du.load_pretrained("classifier", "cpu")
    rows = []
    for steps in args.steps:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                du.train(notebook_config(steps, seed), tmp, device="cpu", progress=False)
                seconds = json.loads((Path(tmp) / "history.json").read_text())["train_seconds"]
                model = du.load_model(Path(tmp) / "ema.pt", "cpu")
            row = {"steps": steps, "seed": seed, "fp32": args.fp32, "train_seconds": round(seconds, 1),
                   "guided_accuracy": accuracy(model, classifier, names), "hardware": describe_device("cpu")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    old = json.loads(OUT.read_text()) if OUT.exists() else {"commands": [], "rows": []}
    key = lambda r: (r["steps"], r["seed"], r["fp32"])  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = sorted([r for r in old["rows"] if key(r) not in new_keys] + rows, key=key)
    command = "python " + shlex.join(["research/notebook3_wait.py", *(argv if argv is not None else sys.argv[1:])])
    OUT.write_text(json.dumps({"commands": old["commands"] + [command], "rows": merged}, indent=1) + "\n")


if __name__ == "__main__":
    main()
