"""Does a longer EMA during training do what averaging two EMA copies afterwards did?

    python -m research.ema_warmup --out runs/ema_warmup      # the shipped run's settings: 25-45 min + 6 min

`EMA` ramps its decay as min(decay, (1 + n) / (ema_warmup + n)): until the ramp reaches the decay (0.999 after
about 1,000 x (ema_warmup - 1) steps) it sets how long the average is, about the last 1 / (ema_warmup - 1) of the
steps so far; after that the decay does (about the last 1,000 steps). This trains the shipped model's
run once (`train --steps 5600 --terminal-signal 0.004 --seed 0`, `--ema-warmup` of the main EMA = the first of
--warmups) and keeps further EMA copies with the other --warmups beside it; they read the same weights at every
step and never touch training, so all of them see one trajectory (the warm-up-10 copy is the shipped recipe's
final EMA). Each is scored like research.ema_length: sprite-FID, n = 1000, DDIM-25 eta 0 and DDIM-50 eta 1,
on `evaluate`'s real sets and seed. Run it alone: other torch work slows training several-fold.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import diffusion_utilities as du
from course_tools.cli import main as cli_main
from course_tools.hardware import describe_device, fast_settings
from course_tools.metrics import load_classifier, real_sets
from course_tools.runs import weights_payload
from research.ema_length import fid_row

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5600  # the shipped run's length (weights/manifest.json)


def train_with_extra_emas(out, warmups):
    """Run the shipped recipe's `train` command with EMA copies for every warm-up in warmups[1:] kept beside
    the main one (warmups[0]); writes ema_warmup<w>.pt for each into out."""
    base_ema, made = du.EMA, []

    class ManyEMA(base_ema):
        def __init__(self, model, decay=0.999, warmup=10):
            super().__init__(model, decay, warmup)
            self.others = {w: base_ema(model, decay, w) for w in warmups[1:]}
            made.append(self)

        def update(self, model):
            super().update(model)
            for other in self.others.values():
                other.update(model)

    du.EMA = ManyEMA  # course_tools.training.run_training makes its EMA as du.EMA(...)
    try:
        cli_main(["train", "--out", str(out), "--steps", str(STEPS), "--terminal-signal", "0.004", "--seed", "0",
                  "--threads", "2", "--ema-warmup", str(warmups[0])])
    finally:
        du.EMA = base_ema
    final = torch.load(out / "ema.pt", weights_only=True)
    torch.save(final, out / f"ema_warmup{warmups[0]}.pt")
    for w, ema in made[-1].others.items():
        torch.save({**final, **weights_payload(ema.model)}, out / f"ema_warmup{w}.pt")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ema_warmup")
    ap.add_argument("--warmups", type=int, nargs="+", default=[5, 3, 4, 10])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--json", default=str(ROOT / "research" / "ema_warmup.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not all((out / f"ema_warmup{w}.pt").exists() for w in args.warmups):
        train_with_extra_emas(out, args.warmups)
    torch.set_num_threads(2)
    images, labels, _ = du.load_sprites()
    classifier = load_classifier("cpu")
    ref, _, mix = real_sets(classifier, images, labels, args.n, 0)
    amp = fast_settings("cpu")[0]
    res = {"command": "python -m research.ema_warmup " + " ".join(sys.argv[1:] if argv is None else argv),
           "n": args.n, "hardware": describe_device("cpu"),
           "train_minutes": round(json.loads((out / "history.json").read_text())["train_seconds"] / 60, 1),
           "rows": []}
    for w in sorted(args.warmups):
        model = du.load_model(out / f"ema_warmup{w}.pt", "cpu")
        row = {"ema_warmup": w, "ema_decay_at_end": round(min(0.999, (1 + STEPS) / (w + STEPS)), 5),
               **fid_row(model, classifier, ref, mix, 0, amp)}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
