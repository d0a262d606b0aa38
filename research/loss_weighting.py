"""Does the loss weight at high noise drive the gap between deterministic and stochastic sampling?

    python -m research.loss_weighting minsnr keep-high-noise plain     # 13 to 20 minutes on 2 CPU cores

With the rescaled schedule (sqrt(ab_T) = 0.004), Min-SNR-5's v-form weight min(SNR, 5) / (SNR + 1) is
almost zero at the first sampling steps (SNR_T = 1.6e-5), where a deterministic sampler fixes a sprite's
layout. This trains `train`'s defaults for 1,000 steps on the rescaled schedule with three weightings of
the v-loss and compares DDIM-25 at eta 0 and eta 1 (sprite-FID, n = 500, as research.terminal_snr):

    minsnr            min(SNR, 5) / (SNR + 1)          the course's (Hang et al. 2023)
    keep-high-noise   min(1, 6 / (SNR + 1))            plain v at high noise, capped like Min-SNR at low noise
    plain             1                                plain v-MSE

The course module has no option for the other two weightings (they lost), so this script swaps the
module's diffusion_loss for one with a `weighting` switch for the duration of the runs.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import diffusion_utilities as du
from course_tools.hardware import describe_device, fast_settings
from course_tools.metrics import classifier_outputs, frechet_distance, load_classifier, real_sets
from course_tools.training import TrainConfig, run_training

ROOT = Path(__file__).resolve().parents[1]

WEIGHTINGS = {
    "minsnr": lambda s: s.clamp(max=5.0) / (s + 1),
    "keep-high-noise": lambda s: (6.0 / (s + 1)).clamp(max=1.0),
    "plain": lambda s: torch.ones_like(s),
}


def loss_with(weight):
    """A v-prediction diffusion loss (the module's draws, in the module's order) with another per-step weight.
    It takes du.diffusion_loss's arguments (du.train_step passes drop_prob, snr_gamma, t_probs, generator); the
    runs draw t uniformly on the CPU, so snr_gamma and t_probs are left unused."""
    def loss(model, x, c, schedule, *, drop_prob=0.1, generator=None, **_):
        B = x.shape[0]
        t = torch.randint(1, schedule.T + 1, (B,), generator=generator)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x_t = du.perturb_input(x, t, noise, schedule)
        keep = (torch.rand(B, generator=generator) >= drop_prob).to(c.dtype)
        pred = model(x_t, t.to(x.dtype) / schedule.T, c * keep[:, None])
        per_image = ((pred.float() - du.velocity(x, noise, t, schedule).float()) ** 2).mean(dim=(1, 2, 3))
        return (weight(du.snr(schedule)[t]) * per_image).mean()
    return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weightings", nargs="*", metavar="WEIGHTING",
                    help=f"which to train (default: all): {', '.join(WEIGHTINGS)}")
    names = ap.parse_args(argv).weightings or list(WEIGHTINGS)
    unknown = [n for n in names if n not in WEIGHTINGS]
    if unknown:
        raise SystemExit(f"unknown weighting {unknown}; choose from {', '.join(WEIGHTINGS)}")
    torch.set_num_threads(2)
    images, labels, _ = du.load_sprites()
    classifier = load_classifier("cpu")
    n = 500
    ref, _, gen_labels = real_sets(classifier, images, labels, n, 0)  # the sets evaluate and terminal_snr use
    gen_labels = torch.as_tensor(gen_labels)
    original, rows = du.diffusion_loss, []
    try:
        for name in names:
            du.diffusion_loss = loss_with(WEIGHTINGS[name])
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                run_training(TrainConfig(steps=1000, terminal_signal=0.004), tmp, device="cpu", progress=False)
                row = {"weighting": name, "train_minutes": round((time.time() - t0) / 60, 1)}
                model = du.load_model(Path(tmp) / "ema.pt", "cpu")
            model.autocast_dtype = fast_settings("cpu")[0]  # sample under bf16 autocast where the CPU has it
            for eta in (0.0, 1.0):
                x, _ = du.sample_ddim(model, n, du.model_schedule(model), n_steps=25, eta=eta, context=gen_labels,
                                      generator=torch.Generator().manual_seed(0))
                row[f"eta{eta:g}"] = round(frechet_distance(classifier_outputs(classifier, x)[0], ref), 2)
            row["ratio"] = round(row["eta0"] / row["eta1"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        du.diffusion_loss = original
    out = ROOT / "research" / "loss_weighting.json"
    out.write_text(json.dumps({"command": "python -m research.loss_weighting " + " ".join(names), "n": n,
                               "hardware": describe_device("cpu"), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
