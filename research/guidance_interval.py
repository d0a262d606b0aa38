"""Guidance only where it helps: classifier-free guidance applied for LOW <= t <= HIGH only (a "guidance
interval", Kynkaenniemi et al. 2024), scored on a grid of guidance weights w and ends LOW (default 0), HIGH;
and guidance rescale (Lin et al. 2024, du.rescale_guidance) on a grid of PHI.

    python -m research.guidance_interval                  # the shipped model; about 8 minutes on 2 CPU cores
    python -m research.guidance_interval --weights F.pt   # a candidate before it ships
    python -m research.guidance_interval --ws 2 4 --lows 100 --highs 400 --out research/guidance_interval_low.json
    python -m research.guidance_interval --ws 2 4 --highs 500 --rescales 0.5 0.7 1 --out research/guidance_rescale.json

Each row is DDIM-25 (eta 0) as in `evaluate`'s guidance table, on its real sets and seeds: sprite-FID of
n samples made for the real data's class mix (seed 0) against n real sprites, and the classifier's
balanced accuracy on --per-class samples of every class (seed 1). Guidance at the noisiest steps
mostly narrows what gets drawn; leaving it out there should keep most of the accuracy at a lower FID.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import diffusion_utilities as du
from course_tools.hardware import describe_device, fast_settings
from course_tools.metrics import guided_scores, load_classifier, real_sets

ROOT = Path(__file__).resolve().parents[1]


def guided_row(model, classifier, ref, mix, class_names, guide_w, interval, *, per_class, amp_dtype, rescale=0.0,
               seed=0):
    """evaluate's guidance-table row (metrics.guided_scores, DDIM-25), as this benchmark reports it."""
    g = guided_scores(model, classifier, du.model_schedule(model), ref, mix, class_names, guide_w, per_class=per_class,
                      guide_interval=interval, guide_rescale=rescale, seed=seed, amp_dtype=amp_dtype, progress=False)
    return {"guide_w": guide_w, "guide_interval": list(interval), "guide_rescale": rescale,
            "fid": round(float(g["fid"]), 3), "kid": round(float(g["kid"]), 4),
            "balanced_accuracy": g["balanced_accuracy"], "worst_class_accuracy": min(g["class_accuracy"].values())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sprites", help="a name in weights/manifest.json")
    ap.add_argument("--weights", default=None, help="a weights or checkpoint file instead of --model")
    ap.add_argument("--ws", type=float, nargs="+", default=[2.0, 4.0], help="guidance weights")
    ap.add_argument("--highs", type=int, nargs="+", default=[450, 400, 350], help="guide only for t <= these")
    ap.add_argument("--lows", type=int, nargs="+", default=[0], help="... and t >= these (0: down to the image)")
    ap.add_argument("--rescales", type=float, nargs="+", default=[0.0], help="guidance rescale phi (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="real sets and noise (0: evaluate's; 1: a held-out check)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "research" / "guidance_interval.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = du.load_model(args.weights, "cpu") if args.weights else du.load_pretrained(args.model, "cpu")
    T = du.model_schedule(model).T
    bad = [(lo, h) for lo in args.lows for h in args.highs if not 0 <= lo <= h <= T]
    if bad:
        raise SystemExit(f"--lows and --highs need 0 <= low <= high <= {T}, got (low, high) {bad}")
    if not all(0 <= phi <= 1 for phi in args.rescales):
        raise SystemExit(f"--rescales need numbers in [0, 1], got {args.rescales}")
    images, labels, class_names = du.load_sprites()
    classifier = load_classifier("cpu")
    amp = fast_settings("cpu")[0]
    ref, _, mix = real_sets(classifier, images, labels, args.n, args.seed)
    res = {"command": "python -m research.guidance_interval " + " ".join(sys.argv[1:] if argv is None else argv),
           "n": args.n, "per_class": args.per_class, "seed": args.seed, "model": args.weights or args.model,
           "hardware": describe_device("cpu"), "rows": []}
    for w in args.ws:
        for low, high, phi in [(lo, h, phi) for lo in args.lows for h in args.highs for phi in args.rescales]:
            row = guided_row(model, classifier, ref, mix, class_names, w, (low, high), per_class=args.per_class,
                             amp_dtype=amp, rescale=phi, seed=args.seed)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
