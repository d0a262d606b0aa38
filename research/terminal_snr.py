"""Is the gap between deterministic DDIM (eta 0) and stochastic sampling the schedule's signal leak?

The course's linear schedule leaves sqrt(ab_T) = 0.079 of the image in x_T, but sampling starts from pure
noise; a deterministic sampler cannot correct that mismatch, a stochastic one can (Lin et al. 2024, "Common
diffusion noise schedules and sample steps are flawed"). This trains the notebook-3 recipe twice for the
same number of steps, once on the course's schedule and once on the same schedule rescaled so that
sqrt(ab_T) = 0.004 (make_schedule's terminal_signal; ab_0 = 1 kept), and compares sprite-FID of
DDIM-25 eta 0 with DDIM-25 eta 1 and the share of pure-white pixels (the sprites' background).
Run it alone: it trains for ~2 x 7 min on 2 cores.

    python -m research.terminal_snr --steps 1000 --out research/terminal_snr.json
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import diffusion_utilities as du
from course_tools.hardware import describe_device, fast_settings
from course_tools.metrics import classifier_outputs, frechet_distance, load_classifier, real_split
from course_tools.training import TrainConfig, run_training


def white_share(x):
    return float((x.clamp(-1, 1) > 0.95).all(1).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="research/terminal_snr.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels, _ = du.load_sprites()
    clf = load_classifier("cpu")
    ref_idx, other_idx = real_split(len(labels), args.n, 0)  # the sets evaluate uses
    ref, _ = classifier_outputs(clf, du.to_tensor_images(images[ref_idx]))
    gen_labels = torch.as_tensor(labels[other_idx])
    rows = []
    for name, terminal in [("course linear, sqrt(ab_T) = 0.079", None), ("rescaled, sqrt(ab_T) = 0.004", 0.004)]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            run_training(TrainConfig(steps=args.steps, terminal_signal=terminal), tmp, device="cpu", progress=False)
            minutes = (time.time() - t0) / 60
            model = du.load_model(Path(tmp) / "ema.pt", "cpu")
        model.autocast_dtype = fast_settings("cpu")[0]  # sample under bf16 autocast where the CPU has it
        schedule = du.make_schedule(500, terminal_signal=terminal)
        row = {"schedule": name, "sqrt_ab_T": float(schedule.ab_t[-1].sqrt()), "steps": args.steps,
               "train_minutes": round(minutes, 1)}
        for eta in (0.0, 1.0):
            x, _ = du.sample_ddim(model, args.n, schedule, n_steps=25, eta=eta, context=gen_labels,
                                  generator=torch.Generator().manual_seed(0))
            f, pred = classifier_outputs(clf, x)
            row[f"eta{eta:g}"] = {"fid": frechet_distance(f, ref), "accuracy": float((pred == gen_labels.numpy()).mean()),
                                  "white_share": white_share(x)}
        row["fid_ratio_eta0_over_eta1"] = row["eta0"]["fid"] / row["eta1"]["fid"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    real_white = white_share(du.to_tensor_images(images[ref_idx]))
    result = {"command": "python -m research.terminal_snr " + " ".join(sys.argv[1:] if argv is None else argv),
              "n": args.n,
              "hardware": describe_device("cpu"), "real_white_share": real_white, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"real white share {real_white:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
