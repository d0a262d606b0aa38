"""Does bf16 autocast change the samples' quality? evaluate's fp32-versus-bf16 row, measured on its own.

The network now computes in bf16 when `model.autocast_dtype` is set (course_tools.hardware.fast_settings
picks it where the hardware has bf16 natively); the samplers take no precision argument. This samples
DDIM-25 (eta 0, no guidance) for the class ids of n random real sprites, exactly as `evaluate` does,
once with the network in bf16 and once in fp32, from the same seed, and scores both the same way.

    python -m research.autocast_row --out research/autocast_row.json     # about 3 minutes on 2 cores
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

import diffusion_utilities as du
from course_tools.hardware import describe_device
from course_tools.metrics import frechet_distance, generate, load_classifier, real_sets, sample_scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="samples per FID (and real sprites per side)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per precision (the time is their median)")
    ap.add_argument("--out", default="outputs/autocast_row.json")
    args = ap.parse_args(argv)
    import torch

    device = du.get_device()
    model, classifier = du.load_pretrained("sprites", device), load_classifier(device)
    schedule = du.model_schedule(model)
    images, labels, _ = du.load_sprites()
    real_ref, real_other, gen_labels = real_sets(classifier, images, labels, args.n, args.seed)
    rows = []
    for name, dtype in (("bf16 autocast", torch.bfloat16), ("fp32", None)):
        secs = []
        for _ in range(args.repeats):  # the same seed each time: the same samples, timed again
            x, s = generate(model, schedule, gen_labels, "ddim", 25, 0.0, 0.0, args.seed, amp_dtype=dtype,
                            progress=False)
            secs.append(s)
        rows.append({"network": name, "s_per_sample": float(np.median(secs)) / args.n,
                     **sample_scores(classifier, x, real_ref, gen_labels)})
        print(rows[-1])
    res = {"command": "python -m research.autocast_row " + " ".join(argv if argv is not None else sys.argv[1:]),
           "hardware": describe_device(device), "torch": torch.__version__, "n": args.n, "seed": args.seed,
           "floor_fid": frechet_distance(real_other, real_ref), "sampler": "DDIM-25, eta 0, w = 0", "rows": rows,
           "fp32_over_bf16_time": rows[1]["s_per_sample"] / rows[0]["s_per_sample"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
