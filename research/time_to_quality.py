"""How good is a model after N minutes of training? Scores snapshots of one run against the clock.

    python -m research.time_to_quality --label "new recipe" --run runs/ship
    python -m research.time_to_quality --label "old recipe" --manifest sprites_step000250 sprites_step001000 \\
        sprites_step004000 sprites --pace 0.4333
    python -m research.time_to_quality --plot          # redraw research/time_to_quality.png from the JSON

Each snapshot is scored as in research.training_recipes (guided accuracy at w = 2 and sprite-FID at w = 0, both
DDIM-25, eta 0). A run made by `python diffusion_utilities.py train` (course_tools.training.run_training)
records the training seconds at which each snapshot was saved; for the weights of an older run (--manifest)
the minutes are estimated as step x --pace (that run's mean minutes per step). Results are merged into
research/time_to_quality.json under --label.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import course_tools.manifest as cman
import diffusion_utilities as du
from course_tools.cli import run_snapshots
from course_tools.hardware import describe_device, fast_settings
from course_tools.metrics import load_classifier
from research.training_recipes import real_features, score

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "research" / "time_to_quality.json"


def points_from_run(run):
    """(minutes, step, path, model args) of every snapshot of a training run's folder, and of its final EMA weights."""
    run = Path(run)
    points = []
    for snap in run_snapshots(run).values():
        meta = torch.load(snap, map_location="cpu", weights_only=True)
        points.append((meta["train_seconds"] / 60, meta["step"], snap, {}))
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    if (run / "ema.pt").exists():
        points.append((ck["train_seconds"] / 60, ck["step"], run / "checkpoint.pt", {}))
    return points


def points_from_manifest(names, pace):
    manifest = cman.read_manifest()
    return [(manifest[n]["step"] * pace, manifest[n]["step"], du.WEIGHTS_DIR / manifest[n]["file"],
             manifest[n].get("args", {})) for n in names]


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4.2))
    for label, rows in results["runs"].items():
        m = [r["minutes"] for r in rows]
        a1.plot(m, [100 * r["guided_accuracy"] for r in rows], "o-", label=label)
        a2.plot(m, [r["fid"] for r in rows], "o-")
    a1.axhline(20, color="grey", ls=":", label="chance (accuracy) / real vs real (FID)")
    a2.axhline(results["fid_floor"], color="grey", ls=":")
    a1.set_ylabel("guided accuracy, w = 2 (%)")
    a2.set_ylabel("sprite-FID, w = 0 (lower is better)")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel("training minutes on a 2-core CPU")
        a.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)  # below the plots, hiding no points
    fig.suptitle("Time to quality on a 2-core CPU (DDIM-25)", fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label")
    ap.add_argument("--run", help="a `diffusion_utilities.py train` output folder with snap_*.pt")
    ap.add_argument("--manifest", nargs="*", default=None, help="weights names in weights/manifest.json")
    ap.add_argument("--pace", type=float, default=None, help="minutes per step, for --manifest")
    ap.add_argument("--hardware", default=None, help="where the scored run trained (default: this machine)")
    ap.add_argument("--plot", action="store_true", help="only redraw the PNG")
    args = ap.parse_args(argv)
    results = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    if not args.plot:
        if not args.label or (args.run is None) == (args.manifest is None):
            raise SystemExit("give --label and exactly one of --run DIR or --manifest NAMES --pace MIN_PER_STEP")
        if args.manifest is not None and args.pace is None:
            raise SystemExit("--manifest needs --pace (the run's minutes per step)")
        device = du.get_device()
        classifier = load_classifier(device)
        real = real_features(classifier, device)
        points = points_from_run(args.run) if args.run else points_from_manifest(args.manifest, args.pace)
        rows = []
        for minutes, step, path, model_args in points:
            model = du.load_model(path, device, **model_args)
            row = {"minutes": round(minutes, 2), "step": step, **score(model, classifier, real["ref"], real["mix"],
                                                                        amp_dtype=fast_settings(device)[0])}
            rows.append(row)
            print(f"{args.label}: {minutes:6.1f} min, step {step:6d}: guided {row['guided_accuracy']:.0%}, "
                  f"FID {row['fid']:.2f}", flush=True)
        results["runs"][args.label] = rows
        results["fid_floor"] = real["floor"]
        results["hardware"] = args.hardware or describe_device(device)
        results.setdefault("commands", {})[args.label] = shlex.join(["python", "-m", "research.time_to_quality",
                                                                     *(sys.argv[1:] if argv is None else argv)])
        OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {plot(results, OUT.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
