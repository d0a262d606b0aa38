"""Does fresh noise shrink an error that deterministic DDIM carries? A check behind notebook 7's wording.

n real sprites (spread over the file) are noised to step t_from; the same x_t is continued to t = 0 with
DDIM on a 50-step grid (the shipped model, its schedule, class contexts), once as given and once with a
small error added (0.1 times standard normal noise), with eta 0 and with eta 1 (both runs of a pair share
their fresh noise). The number per row is |final difference| / |added error|: below 1 the sampler shrank the
error. The notebook would say "fresh noise corrects errors" only if eta 1 shrank it consistently more.

    python -m research.fresh_noise --out research/fresh_noise.json     # about a minute on 2 cores
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import diffusion_utilities as du
from course_tools.hardware import describe_device


def finish(model, schedule, x, context, eta, t_from, grid, seed=1):
    """Continue the DDIM grid's steps at or below t_from down to 0, fresh noise from seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t, t_prev in zip(grid[:-1], grid[1:]):
            if t <= t_from:
                eps = du.predict_noise(model, x, t, schedule, context)
                x = du.denoise_ddim(x, t, t_prev, eps, schedule, eta=eta, z=torch.randn(x.shape, generator=gen))
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, nargs="+", default=[400, 250, 100], help="steps t_from to start at")
    ap.add_argument("--n", type=int, default=100, help="sprites, spread over the file")
    ap.add_argument("--out", default="outputs/fresh_noise.json")
    args = ap.parse_args(argv)
    model = du.load_pretrained("sprites", "cpu")
    schedule = du.model_schedule(model)
    images, labels, _ = du.load_sprites()
    idx = torch.linspace(0, len(labels) - 1, args.n).long().numpy()
    x0, context = du.to_tensor_images(images[idx]), du.one_hot(torch.as_tensor(labels[idx]))
    grid = du.ddim_timesteps(schedule.T, 50)
    rows = []
    for t_from in args.starts:
        x_t = du.perturb_input(x0, t_from, torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)), schedule)
        err = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        for eta in (0.0, 1.0):
            a = finish(model, schedule, x_t, context, eta, t_from, grid)
            b = finish(model, schedule, x_t + err, context, eta, t_from, grid)
            rows.append({"t_from": t_from, "eta": eta, "error_ratio": float((a - b).norm() / err.norm())})
            print(rows[-1], flush=True)
    res = {"command": "python -m research.fresh_noise " + " ".join(sys.argv[1:] if argv is None else argv),
           "hardware": describe_device("cpu"), "n": args.n, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
