"""Why does deterministic DDIM (eta 0) lag stochastic sampling on the shipped model? Two checks, n = 500.

1. BatchNorm's running statistics: sample DDIM-25 once in eval mode and once with each BatchNorm layer
   normalising with the statistics of the batch itself (500 samples at one t, so per-timestep statistics).
2. The backgrounds: the share of pure-white pixels and the spread of each sample's mean brightness, for
   eta 0 and eta 1, against real sprites.

    python -m research.ddim_gap --out research/ddim_gap.json     # about 2 minutes on 2 cores
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import diffusion_utilities as du
from course_tools.hardware import describe_device, fast_settings
from course_tools.metrics import classifier_outputs, frechet_distance, load_classifier, real_split


def batch_statistics_copy(model):
    """A copy whose BatchNorm layers keep no running statistics, so they always use the batch's own."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = m.running_var = None
            m.track_running_stats = False
    return model


def background(x):
    x = x.clamp(-1, 1)
    return {"white_share": float((x > 0.95).all(1).float().mean()), "mean_spread": float(x.mean(dim=(1, 2, 3)).std())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="research/ddim_gap.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels, _ = du.load_sprites()
    clf = load_classifier("cpu")
    model = du.load_pretrained("sprites", "cpu")
    model.autocast_dtype = fast_settings("cpu")[0]  # bf16 autocast where the CPU has it natively (the copy keeps it)
    schedule = du.model_schedule(model)
    ref_idx, other_idx = real_split(len(labels), args.n, 0)  # the sets evaluate uses
    real = du.to_tensor_images(images[ref_idx])
    ref, _ = classifier_outputs(clf, real)
    gen_labels = torch.as_tensor(labels[other_idx])
    rows = []
    for norm, net in [("running statistics (eval)", model), ("batch statistics", batch_statistics_copy(model))]:
        for eta in (0.0, 1.0):
            x, _ = du.sample_ddim(net, args.n, schedule, n_steps=25, eta=eta, context=gen_labels,
                                  generator=torch.Generator().manual_seed(0))
            f, _ = classifier_outputs(clf, x)
            rows.append({"batchnorm": norm, "sampler": "DDIM-25", "eta": eta, "fid": frechet_distance(f, ref), **background(x)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python -m research.ddim_gap " + " ".join(sys.argv[1:] if argv is None else argv),
              "n": args.n, "model": "sprites (shipped)",
              "hardware": describe_device("cpu"), "real": background(real), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"real: {result['real']}; wrote {args.out}")


if __name__ == "__main__":
    main()
