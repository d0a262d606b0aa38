"""Notebook 8's judge (issue 24): the shipped flow-matching model against the shipped diffusion model, at 5, 10
and 25 network calls.

    python -m research.flow_ship

Both are weights/ files with manifest entries: `sprites` (diffusion, v-prediction, sampled with deterministic DDIM)
and `sprites_flow` (the same U-Net and recipe trained with du.flow_loss, sampled with Euler, du.sample_flow). Every
row uses the same real sets and seeds as `evaluate` (course_tools.metrics): sprite-FID and class accuracy of
n = 1,000 samples made for the class ids of n random real sprites, unguided and guided (w = 2). Also per model:
the straightness of its sampling paths in flow variables (du.straightness, 50 Euler steps, 200 samples) and how
far 5, 10 and 25 calls land from 100 calls from the same noise (rms). Run it alone (other torch work slows it).
Writes research/flow_ship.json.

    python -m research.flow_ship --averaging-run runs/flow_ship

instead checks the export's snapshot averaging on the training run's folder (made by the manifest's command):
the final EMA against the EMA averaged with snapshots 2400..3300, at 5 and 10 calls, n = 500 (adds "averaging"
to the JSON, keeping its other numbers), and

    python -m research.flow_ship --record

writes the flow model's headline numbers from research/flow_ship.json into its entry in weights/manifest.json.
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
from course_tools.cli import average_with_snapshots
from course_tools.hardware import describe_device
from course_tools.manifest import record_metrics_in
from course_tools.metrics import frechet_distance, generate, load_classifier, real_sets, sample_scores

OUT = du.ROOT / "research" / "flow_ship.json"
CALLS = (5, 10, 25)


def path_measures(model, schedule, *, n=200, seed=2):
    """Median straightness (50 Euler steps) and the rms distance of 5/10/25 calls to 100 calls, same noise."""
    classes = torch.arange(n) % 5

    def run(k):
        return du.sample_flow(model, n, schedule, n_steps=k, context=classes, generator=torch.Generator().manual_seed(seed))

    _, frames, grid = run(50)
    reference = run(100)[0]
    return {"straightness_median": float(np.median(du.straightness(frames, grid))),
            "straightness_quartiles": [float(q) for q in np.quantile(du.straightness(frames, grid), [0.25, 0.75])],
            "rms_to_100_steps": {k: float(((run(k)[0] - reference) ** 2).mean().sqrt()) for k in CALLS}}


def averaging_check(run, classifier, images, labels, *, n=500, seed=0, snapshots=(2400, 2700, 3000, 3300)):
    """Sprite-FID (unguided and w = 2) of the run's final EMA and of its average with the snapshots, at n."""
    real_ref, _, gen_labels = real_sets(classifier, images, labels, n, seed)
    weights, args, _ = du.read_weights(f"{run}/checkpoint.pt")
    averaged = du.ContextUnet(**args)
    params = {name for name, _ in averaged.named_parameters()}
    averaged.load_state_dict(average_with_snapshots(weights, run, list(snapshots), keys=params))
    rows = []
    for name, model in [("final EMA", du.load_model(f"{run}/ema.pt", "cpu")), ("averaged", averaged.eval())]:
        for calls in (5, 10):
            x, _ = generate(model, None, gen_labels, "euler", calls, seed=seed, progress=False)
            xg, _ = generate(model, None, gen_labels, "euler", calls, guide_w=2.0, seed=seed + 1, progress=False)
            rows.append({"weights": name, "calls": calls, "fid": sample_scores(classifier, x, real_ref, gen_labels)["fid"],
                         "guided_fid": sample_scores(classifier, xg, real_ref, gen_labels)["fid"]})
            print(json.dumps(rows[-1]), flush=True)
    return {"n": n, "snapshots": list(snapshots), "rows": rows}


def record(path):
    """The flow model's headline numbers (every call count, unguided and w = 2) into its manifest entry."""
    res = json.loads(open(path).read())
    rows = {r["calls"]: r for r in res["rows"] if r["model"] == "flow"}
    metrics = {"n": res["n"], "sampler": "euler", "at_guide_w": res["guide_w"], "tables": "../research/flow_ship.json"}
    for k, r in sorted(rows.items()):
        metrics.update({f"fid_euler{k}": r["fid"], f"accuracy_euler{k}": r["accuracy"],
                        f"guided_fid_euler{k}": r["guided_fid"], f"guided_accuracy_euler{k}": r["guided_accuracy"]})
    record_metrics_in("sprites_flow", metrics)
    print("recorded the flow model's metrics in weights/manifest.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--averaging-run", default=None, help="a flow training run's folder: check the export's averaging")
    ap.add_argument("--record", action="store_true", help="write the flow model's numbers into weights/manifest.json")
    args = ap.parse_args(argv)
    if args.record:
        return record(args.out)
    torch.set_num_threads(2)
    images, labels, _ = du.load_sprites()
    classifier = load_classifier("cpu")
    if args.averaging_run:
        out = json.loads(open(args.out).read())
        out["averaging"] = {"command": "python -m research.flow_ship " + shlex.join(sys.argv[1:] if argv is None else argv),
                            **averaging_check(args.averaging_run, classifier, images, labels)}
        with open(args.out, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")
        print("wrote", args.out)
        return
    real_ref, real_other, gen_labels = real_sets(classifier, images, labels, args.n, args.seed)
    models = {"diffusion": du.load_pretrained("sprites", "cpu"), "flow": du.load_pretrained("sprites_flow", "cpu")}
    rows, paths = [], {}
    for name, model in models.items():
        schedule = du.model_schedule(model) if name == "diffusion" else None
        sampler = "ddim" if name == "diffusion" else "euler"
        for calls in CALLS:
            t0 = time.time()
            x, secs = generate(model, schedule, gen_labels, sampler, calls, seed=args.seed, progress=False)
            xg, _ = generate(model, schedule, gen_labels, sampler, calls, guide_w=2.0, seed=args.seed + 1, progress=False)
            plain = sample_scores(classifier, x, real_ref, gen_labels)
            guided = sample_scores(classifier, xg, real_ref, gen_labels)
            rows.append({"model": name, "sampler": sampler, "calls": calls, "s_per_sample": secs / args.n, **plain,
                         "guided_fid": guided["fid"], "guided_kid": guided["kid"], "guided_accuracy": guided["accuracy"]})
            print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
        paths[name] = path_measures(model, schedule)
        print(name, json.dumps(paths[name]), flush=True)
    out = {"command": "python -m research.flow_ship " + shlex.join(sys.argv[1:] if argv is None else argv),
           "hardware": describe_device("cpu"), "n": args.n, "seed": args.seed, "guide_w": 2.0,
           "floor_fid": frechet_distance(real_other, real_ref), "rows": rows, "paths": paths}
    with open(args.out, "w") as f:
        f.write(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
