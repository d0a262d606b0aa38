"""Notebook 9's speed rows: one call of the one-call student for 16 sprites, and one redraw of the widget.

    python -m research.bench_one_call          # about 30 seconds; writes research/bench_one_call.json

Each twice, after warm-up runs, interleaved, medians: in fp32, and with the fast settings notebook 9's widget uses
(course_tools.hardware.use_fast_settings: bf16 autocast and channels-last where the CPU has native bf16, else fp32):
  * network: du.sample_ddim(student, 16, ..., n_steps=1) from fixed noise, a blended context;
  * redraw: the same call plus what the widget draws: du.show_images of the 16 sprites on a fresh figure,
    rendered to pixels by matplotlib's Agg backend (the inline backend renders the same way, then sends a PNG).
Aims (issue 25): the network under 30 ms, a redraw under 200 ms. Run it alone: other work on 2 cores slows it.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import diffusion_utilities as du  # noqa: E402
from course_tools.hardware import describe_device, fast_settings, use_fast_settings  # noqa: E402

OUT = du.ROOT / "research" / "bench_one_call.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32 = du.load_pretrained("sprites_student1", "cpu")
    fast = copy.deepcopy(fp32)
    use_fast_settings(fast, "cpu")
    schedule = du.model_schedule(fp32)
    context = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0]]).expand(16, 5)
    noise = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def network(student):
        return du.sample_ddim(student, 16, schedule, n_steps=1, context=context, x_T=noise)[0]

    def redraw(student):
        fig = plt.figure(figsize=(6, 1.8))
        du.show_images(network(student), nrow=8, ax=fig.add_subplot(), scale=1.0)
        fig.canvas.draw()
        plt.close(fig)

    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        redraw(fp32), redraw(fast)
    times = {(kind, name): [] for kind in ("fp32", "fast") for name in ("network", "redraw")}
    for _ in range(args.repeats):
        for kind, student in (("fp32", fp32), ("fast", fast)):
            for name, fn in (("network", network), ("redraw", redraw)):
                t0 = time.perf_counter()
                fn(student)
                times[kind, name].append(1000 * (time.perf_counter() - t0))
    res = {"command": "python -m research.bench_one_call", "hardware": describe_device("cpu"), "threads": args.threads,
           "repeats": args.repeats, "fast_settings": "{}, {}".format(*(str(v) for v in fast_settings("cpu"))),
           "network_ms": statistics.median(times["fast", "network"]),
           "redraw_ms": statistics.median(times["fast", "redraw"]),
           "network_ms_fp32": statistics.median(times["fp32", "network"]),
           "redraw_ms_fp32": statistics.median(times["fp32", "redraw"]),
           "quartiles_ms": {f"{kind} {name}": statistics.quantiles(v, n=4)[::2] for (kind, name), v in times.items()}}
    with open(args.out, "w") as f:
        f.write(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
