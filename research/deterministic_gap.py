"""What is left of the gap between deterministic and stochastic sampling on the shipped model, and why
guidance at w >= 2 costs more sprite-FID than it did on the 101-minute model.

    python -m research.deterministic_gap            # about 6 minutes on 2 CPU cores; writes deterministic_gap.json

Three checks, each at n = 1000 on the same real sets and class mix as `evaluate` (seed 0, bf16 autocast
where the CPU has it):
1. DDIM-25 (eta 0) with other timestep spacings than ddim_timesteps' uniform one: log-SNR (as DPM-Solver
   uses), quadratic (dense near t = 0), and t = T (i / 25)^p for p = 0.85 (a little denser at high noise)
   and 1.15 (a little denser at low noise).
2. BatchNorm statistics re-estimated with the EMA weights (the EMA copy keeps the live network's running
   statistics): DDIM-25 eta 0, DDIM-50 eta 1 and guided DDIM-25 w = 2.
3. Guidance only below a noise level (a "guidance interval", Kynkaenniemi et al. 2024): w = 2 applied for
   t <= t_max only; sprite-FID on the real class mix and accuracy on 100 samples per class.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import diffusion_utilities as du
from course_tools.hardware import computing_in, describe_device, fast_settings
from course_tools.metrics import (
    classifier_outputs,
    frechet_distance,
    generate,
    guided_scores,
    load_classifier,
    real_sets,
)

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def ddim(model, schedule, steps, labels, seed, amp_dtype):
    """Deterministic DDIM (w = 0) through the given timesteps (T ... 0), in batches of 250 as evaluate draws them."""
    gen, out = torch.Generator().manual_seed(seed), []
    labels = torch.as_tensor(labels).long()
    for i in range(0, len(labels), 250):
        c = du.one_hot(labels[i:i + 250], model.n_cfeat)
        x = torch.randn((len(c), model.in_channels, model.height, model.height), generator=gen)
        with computing_in(model, amp_dtype):
            for t, t_prev in zip(steps[:-1], steps[1:]):
                eps = du.predict_noise(model, x, t, schedule, c)
                x = du.denoise_ddim(x, t, t_prev, eps, schedule, eta=0.0)
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def recalibrated(model, schedule, images, labels, *, n_batches=200, batch=128, seed=0, amp_dtype=None):
    """A copy of the model whose BatchNorm running statistics are re-estimated with its own weights, on
    noised training batches drawn as training draws them (uniform t, 10% context dropout, flips)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # a plain average over every batch
    m.train()
    x_all = du.to_tensor_images(images)  # float (N, 3, H, W) in [-1, 1]
    c_all = du.one_hot(torch.from_numpy(labels), m.n_cfeat)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x = du.augment_batch(x_all[idx], generator=g)
        t = torch.randint(1, schedule.T + 1, (batch,), generator=g)
        x_t = du.perturb_input(x, t, torch.randn(x.shape, generator=g), schedule)
        keep = (torch.rand(batch, generator=g) >= 0.1).float()[:, None]
        with computing_in(m, amp_dtype):
            m(x_t, t.float() / schedule.T, c_all[idx] * keep)
    return m.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "research" / "deterministic_gap.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    images, labels, names = du.load_sprites()
    classifier = load_classifier("cpu")
    real_ref, _, mix = real_sets(classifier, images, labels, args.n, 0)
    model = du.load_pretrained("sprites", "cpu")
    schedule = du.model_schedule(model)
    amp = fast_settings("cpu")[0]

    def fid(x):
        return float(frechet_distance(classifier_outputs(classifier, x)[0], real_ref))

    res = {"command": "python -m research.deterministic_gap " + " ".join(sys.argv[1:] if argv is None else argv),
           "n": args.n, "model": "sprites (shipped)", "hardware": describe_device("cpu"), "spacing": [],
           "batchnorm": [], "guidance_interval": []}
    T = schedule.T
    spacings = {"uniform (ddim_timesteps)": du.ddim_timesteps(T, 25),
                "log-SNR (logsnr_timesteps)": du.logsnr_timesteps(schedule, 25),
                **{name: sorted({round(T * (i / 25) ** p) for i in range(26)}, reverse=True)
                   for name, p in [("quadratic", 2), ("power 0.85", 0.85), ("power 1.15", 1.15)]}}
    for name, steps in spacings.items():
        res["spacing"].append({"spacing": name, "calls": len(steps) - 1, "fid": fid(ddim(model, schedule, steps, mix, 0, amp))})
        print(json.dumps(res["spacing"][-1]), flush=True)
    for name, m in [("running statistics as trained", model),
                    ("re-estimated with the EMA weights", recalibrated(model, schedule, images, labels, amp_dtype=amp))]:
        row = {"batchnorm": name}
        for sampler, k, eta, w in [("ddim", 25, 0.0, 0.0), ("ddim", 50, 1.0, 0.0), ("ddim", 25, 0.0, 2.0)]:
            x, _ = generate(m, schedule, mix, sampler, k, eta, w, 0, amp_dtype=amp, progress=False)
            row[f"DDIM-{k} eta {eta:g} w {w:g}"] = fid(x)
        res["batchnorm"].append(row)
        print(json.dumps(row), flush=True)
    for below in (T, 400, 300):  # evaluate's guidance row (FID: mix, seed 0; accuracy: 100 per class, seed 1)
        g = guided_scores(model, classifier, schedule, real_ref, mix, names, 2.0, guide_interval=(0, below),
                          amp_dtype=amp, progress=False)
        row = {"guide_w": 2.0, "guided_for_t_at_most": below, "fid": g["fid"], "accuracy": g["balanced_accuracy"]}
        res["guidance_interval"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
