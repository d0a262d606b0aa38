"""diffusion_utilities.py: everything the course's notebooks run, in the order the course teaches it.

    1. Noise schedule        make_schedule
    2. Forward process       perturb_input
    3. Model                 ContextUnet
    4. Training              diffusion_loss, train_step, EMA, train (resumable, with checkpoints)
    5. Samplers              denoise_add_noise, denoise_ddim, sample_ddpm, sample_ddim
    6. Data                  load_sprites, SpriteDataset, augment_batch
    7. Pictures              show_images, plot_sample, animation_html, save_gif
    8. Weights               get_device, load_model, load_pretrained
    9. Metrics               SpriteClassifier, frechet_distance, kernel_inception_distance, nearest_neighbours
   10. Command line          python diffusion_utilities.py train|sample|evaluate --help

Conventions. Images are float tensors of shape (B, 3, H, W) in [-1, 1]. Timesteps are integers
0..T, where x_0 is a clean image and x_T is (almost) pure noise; the network is given t / T.
A context is a (B, n_cfeat) float tensor: one-hot for a class, a blend of rows for a mix, all zeros
for "no context". Nothing here reads notebook globals: every function takes what it needs.

The names follow DeepLearning.AI's "How Diffusion Models Work" (perturb_input, denoise_add_noise,
denoise_ddim, ContextUnet, sample_ddpm, sample_ddim), with that course's bugs fixed: the forward
process has its square root, the residual shortcut is a trained layer, DDIM works for any step count.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parent
DATA_FILE = ROOT / "data" / "sprites16.npz"
WEIGHTS_DIR = ROOT / "weights"


# ---------------------------------------------------------------------------------------------
# 1. Noise schedule
# ---------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    """The noise schedule, indexed by timestep 0..T (so each tensor has T + 1 entries).

    b_t:  beta_t, the variance of the noise added at step t.
    a_t:  alpha_t = 1 - beta_t, the share of variance kept at step t.
    ab_t: alpha-bar_t = a_1 * a_2 * ... * a_t, the share of the clean image's variance left at t;
          ab_t[0] == 1 (no noise yet).
    """
    b_t: torch.Tensor
    a_t: torch.Tensor
    ab_t: torch.Tensor

    @property
    def T(self) -> int:
        return len(self.b_t) - 1

    def to(self, device) -> "Schedule":
        return Schedule(self.b_t.to(device), self.a_t.to(device), self.ab_t.to(device))


def make_schedule(timesteps=500, beta1=1e-4, beta2=0.02, kind="linear"):
    """A DDPM noise schedule with T = `timesteps` steps.

    kind="linear" (the course's): beta_t grows linearly from beta1 at t=0 to beta2 at t=T.
    kind="cosine" (Nichol & Dhariwal 2021): alpha-bar follows a squared cosine; beta1 and beta2
    are ignored. It destroys the image more gradually, which helps small images.
    Computed in float64, stored as float32 tensors of shape (timesteps + 1,).
    """
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    if kind == "linear":
        if not 0 < beta1 <= beta2 < 1:
            raise ValueError(f"need 0 < beta1 <= beta2 < 1, got beta1={beta1}, beta2={beta2}")
        b_t = beta1 + (beta2 - beta1) * torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
        a_t = 1 - b_t
        # The product starts at t=1: x_1 has had exactly one step of noise. (The course's version
        # also multiplied in a_0, which is off by a factor of 1 - beta1.)
        ab_t = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(a_t[1:], 0)])
    elif kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        ab_t = f / f[0]
        b_t = torch.zeros_like(ab_t)
        b_t[1:] = (1 - ab_t[1:] / ab_t[:-1]).clamp(max=0.999)  # the clamp keeps the last step finite
        a_t = 1 - b_t
        ab_t = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(a_t[1:], 0)])
    else:
        raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
    return Schedule(b_t.float(), a_t.float(), ab_t.float())


def _check_images(x, name="x"):
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of images with shape (B, C, H, W), got {shape}")


def _timestep_tensor(t, batch, schedule, name="t", low=0):
    """t as a LongTensor of shape (batch,), checked to lie in low..T."""
    T = schedule.T
    if isinstance(t, (int, np.integer)):
        t = torch.full((batch,), int(t), dtype=torch.long)
    elif torch.is_tensor(t):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must hold integer timesteps {low}..{T}, got a {t.dtype} tensor "
                             "(the model takes t/T, the schedule takes the integer t)")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"{name} must be an int or a tensor of shape ({batch},), got {tuple(t.shape)}")
        t = t.long()
    else:
        raise ValueError(f"{name} must be an int or a LongTensor, got {type(t).__name__}")
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi > T:
        raise ValueError(f"{name} must lie in {low}..{T} for this schedule, got values {lo}..{hi}")
    return t


def _at(values, t, x):
    """values[t] shaped (B, 1, 1, 1) to broadcast over images like x."""
    return values.to(x.device)[t.to(x.device)].view(-1, 1, 1, 1).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# 2. Forward process: noising in closed form
# ---------------------------------------------------------------------------------------------

def perturb_input(x, t, noise, schedule):
    """x_t = sqrt(ab_t[t]) * x + sqrt(1 - ab_t[t]) * noise: jump straight to step t.

    x, noise: (B, C, H, W); t: int or LongTensor (B,) in 0..T. For data with unit variance, x_t keeps
    unit variance at every t, which is why both coefficients carry a square root. (The original
    course forgot the root on 1 - ab_t: its x_t lost a quarter of its variance around t = 180.)
    """
    _check_images(x)
    if not torch.is_tensor(noise) or noise.shape != x.shape:
        got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
        raise ValueError(f"noise must have the same shape as x, {tuple(x.shape)}, got {got}")
    t = _timestep_tensor(t, x.shape[0], schedule)
    ab = _at(schedule.ab_t, t, x)
    return ab.sqrt() * x + (1 - ab).sqrt() * noise


def predict_x0(x_t, t, pred_noise, schedule):
    """The clean image implied by a noise prediction: invert perturb_input for x. Same shapes."""
    _check_images(x_t, "x_t")
    t = _timestep_tensor(t, x_t.shape[0], schedule)
    ab = _at(schedule.ab_t, t, x_t)
    return (x_t - (1 - ab).sqrt() * pred_noise) / ab.sqrt()


# ---------------------------------------------------------------------------------------------
# 3. Model: the course's ContextUnet, with its shortcut and pooling bugs fixed
# ---------------------------------------------------------------------------------------------

def make_norm(kind, channels):
    """A normalisation layer: "batch" (the course's BatchNorm2d) or "group" (GroupNorm, 8 groups).

    BatchNorm normalises with statistics of the whole batch, which mixes every noise level, and at
    sampling time it uses running averages of them; GroupNorm normalises each image on its own, so
    training and sampling see the same arithmetic (and data-parallel training needs nothing special).
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class ResidualConvBlock(nn.Module):
    """Two 3x3 conv -> norm -> GELU layers, optionally with a residual connection.

    The shortcut for a change of channel count is a 1x1 conv built here, once, so it is trained and
    saved. (The course built a fresh random one on every forward pass.)
    """

    def __init__(self, in_channels, out_channels, is_res=False, norm="batch"):
        super().__init__()
        self.is_res = is_res
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1),
                                   make_norm(norm, out_channels), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, 1, 1),
                                   make_norm(norm, out_channels), nn.GELU())
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                         if is_res and in_channels != out_channels else nn.Identity())

    def forward(self, x):
        h = self.conv2(self.conv1(x))
        if not self.is_res:
            return h
        return (self.shortcut(x) + h) / math.sqrt(2)  # keeps the sum's variance near 1


class UnetDown(nn.Module):
    """Two conv blocks, then halve H and W."""

    def __init__(self, in_channels, out_channels, norm="batch"):
        super().__init__()
        self.model = nn.Sequential(ResidualConvBlock(in_channels, out_channels, norm=norm),
                                   ResidualConvBlock(out_channels, out_channels, norm=norm), nn.MaxPool2d(2))

    def forward(self, x):
        return self.model(x)


class UnetUp(nn.Module):
    """Concatenate the skip connection, double H and W, then two conv blocks."""

    def __init__(self, in_channels, out_channels, norm="batch"):
        super().__init__()
        self.model = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
                                   ResidualConvBlock(out_channels, out_channels, norm=norm),
                                   ResidualConvBlock(out_channels, out_channels, norm=norm))

    def forward(self, x, skip):
        return self.model(torch.cat((x, skip), 1))


class EmbedFC(nn.Module):
    """A two-layer MLP that embeds a time or context vector: (B, input_dim) -> (B, emb_dim, 1, 1)."""

    def __init__(self, input_dim, emb_dim):
        super().__init__()
        self.input_dim = input_dim
        self.model = nn.Sequential(nn.Linear(input_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, x):
        return self.model(x.reshape(-1, self.input_dim))[:, :, None, None]


class ContextUnet(nn.Module):
    """A small U-Net that predicts the noise in x_t (or v), given the time t/T and a context vector.

    x: (B, in_channels, height, height); t: (B,) floats t/T in [0, 1] (a float or a tensor that
    broadcasts to (B,) also works); c: (B, n_cfeat) floats, or None for the zero context.
    Returns a tensor of x's shape: the predicted noise eps when prediction="eps" (the course's), or
    the velocity v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 when prediction="v" (Salimans & Ho 2022;
    the samplers convert it back to eps, see predict_noise). Time and context enter the decoder at
    two resolutions: the context embedding multiplies the features, the time embedding is added.
    norm: "batch" (the course's BatchNorm) or "group" (see make_norm). zero_init=True starts the
    last conv at zero, so the untrained network predicts 0 and the loss starts at exactly E[target^2].
    About 1.48 M parameters at n_feat=64, 0.37 M at n_feat=32.
    """

    def __init__(self, in_channels=3, n_feat=64, n_cfeat=5, height=16, *, norm="batch", prediction="eps",
                 zero_init=False):
        super().__init__()
        if height % 4 != 0 or height < 4:
            raise ValueError(f"height must be a positive multiple of 4 (the U-Net halves it twice), got {height}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' (noise) or 'v' (velocity), got {prediction!r}")
        self.in_channels, self.n_feat, self.n_cfeat, self.h = in_channels, n_feat, n_cfeat, height
        self.prediction = prediction

        self.init_conv = ResidualConvBlock(in_channels, n_feat, is_res=True, norm=norm)
        self.down1 = UnetDown(n_feat, n_feat, norm)          # -> (B, F, h/2, h/2)
        self.down2 = UnetDown(n_feat, 2 * n_feat, norm)      # -> (B, 2F, h/4, h/4)
        self.to_vec = nn.Sequential(nn.AvgPool2d(height // 4), nn.GELU())  # -> (B, 2F, 1, 1)

        self.timeembed1 = EmbedFC(1, 2 * n_feat)
        self.timeembed2 = EmbedFC(1, n_feat)
        self.contextembed1 = EmbedFC(n_cfeat, 2 * n_feat)
        self.contextembed2 = EmbedFC(n_cfeat, n_feat)

        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, height // 4, height // 4),
                                 nn.GroupNorm(8, 2 * n_feat), nn.ReLU())  # -> (B, 2F, h/4, h/4)
        self.up1 = UnetUp(4 * n_feat, n_feat, norm)          # -> (B, F, h/2, h/2)
        self.up2 = UnetUp(2 * n_feat, n_feat, norm)          # -> (B, F, h, h)
        self.out = nn.Sequential(nn.Conv2d(2 * n_feat, n_feat, 3, 1, 1), nn.GroupNorm(8, n_feat), nn.ReLU(),
                                 nn.Conv2d(n_feat, in_channels, 3, 1, 1))
        if zero_init:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, c=None):
        B = x.shape[0] if torch.is_tensor(x) else 0
        expected = (self.in_channels, self.h, self.h)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {got}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.numel() not in (1, B):
            raise ValueError(f"t must hold 1 or B={B} values of t/T, got shape {tuple(t.shape)}")
        t = t.reshape(-1, 1).expand(B, 1)
        if c is None:
            c = torch.zeros(B, self.n_cfeat, dtype=x.dtype, device=x.device)
        elif not torch.is_tensor(c) or c.shape != (B, self.n_cfeat):
            got = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            raise ValueError(f"c must be a (B, n_cfeat) = ({B}, {self.n_cfeat}) context tensor or None, got {got}")
        c = c.to(x.dtype)

        x0 = self.init_conv(x)
        d1 = self.down1(x0)
        d2 = self.down2(d1)
        hidden = self.to_vec(d2)

        cemb1, temb1 = self.contextembed1(c), self.timeembed1(t)
        cemb2, temb2 = self.contextembed2(c), self.timeembed2(t)

        u1 = self.up0(hidden)
        u2 = self.up1(cemb1 * u1 + temb1, d2)
        u3 = self.up2(cemb2 * u2 + temb2, d1)
        return self.out(torch.cat((u3, x0), 1))


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# 4. Training
# ---------------------------------------------------------------------------------------------

def one_hot(labels, n_cfeat=5):
    """Integer class ids (B,) -> float one-hot contexts (B, n_cfeat)."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of integer class ids, got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_cfeat):
        raise ValueError(f"class ids must lie in 0..{n_cfeat - 1}, got {int(labels.min())}..{int(labels.max())}")
    return F.one_hot(labels.long(), n_cfeat).float()


def snr(schedule):
    """Signal-to-noise ratio of x_t at every step: ab_t / (1 - ab_t), shape (T + 1,) (inf at t = 0)."""
    return schedule.ab_t / (1 - schedule.ab_t)


def velocity(x0, noise, t, schedule):
    """The v-prediction target (Salimans & Ho 2022): v = sqrt(ab_t) * noise - sqrt(1 - ab_t) * x0.

    Where eps-prediction asks "which noise?" and is nearly trivial at high noise (x_t is almost all
    noise), v changes smoothly from -x0 at pure noise to the noise itself at t = 0, so every step
    teaches the network something about the image. Shapes as perturb_input.
    """
    t = _timestep_tensor(t, x0.shape[0], schedule)
    ab = _at(schedule.ab_t, t, x0)
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def timestep_probabilities(schedule, kind="uniform"):
    """How training draws t: probabilities over 1..T, shape (T,).

    "uniform" (DDPM's). "lognormal" puts the mass where the loss is learnable: the noise level
    sigma_t = sqrt((1 - ab_t) / ab_t) is drawn log-normally, ln sigma ~ N(-1.2, 1.2^2) (Karras et al.
    2022, EDM), and mapped to our integer steps. That skips most of the almost-clean and the
    almost-pure-noise steps, where the network can learn little.
    """
    T = schedule.T
    if kind == "uniform":
        return torch.full((T,), 1.0 / T)
    if kind != "lognormal":
        raise ValueError(f"t sampling must be 'uniform' or 'lognormal', got {kind!r}")
    log_sigma = 0.5 * torch.log((1 - schedule.ab_t.double()) / schedule.ab_t.double())  # -inf at t = 0
    density = torch.exp(-0.5 * ((log_sigma[1:] + 1.2) / 1.2) ** 2)
    width = torch.diff(log_sigma).clamp(min=0)
    width[0] = log_sigma[2] - log_sigma[1]  # the first step starts at sigma = 0 (log -inf)
    p = density * width
    return (p / p.sum()).float()


def diffusion_loss(model, x, c, schedule, drop_prob=0.1, generator=None, *, snr_gamma=None, t_probs=None,
                   input_perturbation=0.0):
    """The DDPM training objective on one batch: MSE between the true and the predicted target.

    x: clean images (B, C, H, W) in [-1, 1]; c: contexts (B, n_cfeat) or None. A random t in 1..T
    per image; each context is replaced by the zero vector with probability drop_prob, so the same
    network also learns unconditional generation (needed for classifier-free guidance).
    The target is the noise, or v = velocity(...) for a model with prediction="v".
    snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023): each image's loss is weighted by
      min(SNR_t, gamma) / SNR_t (eps) or min(SNR_t, gamma) / (SNR_t + 1) (v), which stops the
      low-noise steps from dominating the gradient. None = unweighted.
    t_probs: probabilities of t = 1..T, shape (T,) (see timestep_probabilities); None = uniform.
    input_perturbation: gamma of Ning et al. 2023: x_t is made with noise + gamma * extra noise, while
      the target stays the noise, to mimic the errors the sampler will feed the network.
    """
    _check_images(x)
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
    B, dev = x.shape[0], x.device
    gdev = generator.device if generator is not None else dev  # a seeded CPU generator also drives a GPU run
    if t_probs is None:
        t = torch.randint(1, schedule.T + 1, (B,), device=gdev, generator=generator).to(dev)
    else:
        t = (torch.multinomial(t_probs.to(gdev), B, replacement=True, generator=generator) + 1).to(dev)
    noise = torch.randn(x.shape, device=gdev, generator=generator, dtype=x.dtype).to(dev)
    fed = noise
    if input_perturbation > 0:
        extra = torch.randn(x.shape, device=gdev, generator=generator, dtype=x.dtype).to(dev)
        fed = noise + input_perturbation * extra
    x_t = perturb_input(x, t, fed, schedule)
    if c is not None:
        keep = (torch.rand(B, device=gdev, generator=generator) >= drop_prob).to(dev, c.dtype)
        c = c * keep[:, None]
    pred = model(x_t, t.to(x.dtype) / schedule.T, c)
    v_pred = getattr(model, "prediction", "eps") == "v"
    target = velocity(x, noise, t, schedule) if v_pred else noise
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    s = snr(schedule).to(dev)[t]
    weight = s.clamp(max=snr_gamma) / (s + 1 if v_pred else s)
    per_image = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    return (weight * per_image).mean()


def autocast_context(device, dtype):
    """torch.autocast for dtype (e.g. torch.bfloat16) on device, or a no-op when dtype is None."""
    device = torch.device(device)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def train_step(model, optimizer, x, c, schedule, drop_prob=0.1, generator=None, amp_dtype=None, **loss_options):
    """One optimiser step on one batch; returns the loss as a float.

    amp_dtype=torch.bfloat16 runs the network under autocast (weights and optimiser stay fp32).
    loss_options go to diffusion_loss (snr_gamma, t_probs, input_perturbation).
    """
    model.train()
    with autocast_context(x.device, amp_dtype):
        loss = diffusion_loss(model, x, c, schedule, drop_prob, generator, **loss_options)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


class EMA:
    """An exponential moving average of a model's weights, used for sampling.

    The decay ramps up as min(decay, (1 + n) / (warmup + n)) so early averages are not dominated by
    the random initialisation (a larger warmup averages over fewer steps early on). BatchNorm
    buffers are copied, not averaged.
    """

    def __init__(self, model, decay=0.999, warmup=10):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval()
        self.n_updates = 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.n_updates += 1
        d = min(self.decay, (1 + self.n_updates) / (self.warmup + self.n_updates))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1 - d)
        for be, b in zip(self.model.buffers(), model.buffers()):
            be.copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "n_updates": self.n_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.decay, self.n_updates = state["decay"], state["n_updates"]
        self.model.load_state_dict(state["model"])


def lr_at(step, total_steps, lr=1e-3, lr_min=5e-5, warmup=200):
    """Learning rate at a step: linear warm-up, then cosine decay from lr to lr_min at total_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


def cpu_supports_bf16():
    """True when this CPU has native bf16 instructions (AVX512-BF16 or AMX), where autocast pays.

    Elsewhere bf16 autocast on a CPU is emulated and slower than fp32, so the course stays in fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_settings(device):
    """(amp_dtype, memory_format) that train fastest on device without hurting quality.

    channels_last + bf16 autocast trained ~1.9x faster than fp32 on an AVX512-BF16 CPU with the
    same loss curve; on CPUs without native bf16 we keep fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else None), torch.channels_last
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16, torch.channels_last
    return None, torch.contiguous_format


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint.

    The defaults are the shipped model's recipe, chosen by benchmarks/training_recipes.py: v-prediction
    and Min-SNR-5 weighting each bought more than any other change at a fixed wall-clock budget.
    """
    steps: int = 3300
    batch_size: int = 128
    lr: float = 1e-3
    lr_min: float = 5e-5
    warmup: int = 200
    drop_prob: float = 0.1
    ema_decay: float = 0.999
    ema_warmup: int = 10
    n_feat: int = 64
    norm: str = "batch"
    prediction: str = "v"
    zero_init: bool = False
    snr_gamma: float | None = 5.0
    t_sampling: str = "uniform"
    input_perturbation: float = 0.0
    timesteps: int = 500
    seed: int = 0
    flip: bool = True
    jitter: float = 0.0
    class_balance: float = 0.5
    snapshot_steps: list = field(default_factory=list)
    checkpoint_every: int = 500


def class_sampling_weights(labels, power=0.5):
    """Per-sprite sampling weights so class c is drawn with probability proportional to n_c**power.

    power=1 keeps the data's proportions, power=0 balances classes fully (and makes the model
    memorise the 48 food sprites); 0.5 is a modest boost for rare classes.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    w = counts[labels].astype(np.float64) ** (power - 1.0)
    return w / w.sum()


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunLock:
    """out_dir/LOCK, holding the owner's process id, for as long as a training runs in out_dir.

    A second training on the same folder stops at once with a message naming the first, instead of
    both writing the same checkpoint. A lock left by a process that no longer runs is taken over.
    """

    def __init__(self, out_dir):
        self.path = Path(out_dir) / "LOCK"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _process_alive(pid):
                    raise RuntimeError(f"{self.path.parent} is in use by training process {pid}; wait for it to "
                                       "finish, stop it, or choose another output folder") from None
                self.path.unlink(missing_ok=True)  # stale: its process has gone
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def train(config, out_dir, data_path=DATA_FILE, resume=False, minutes=None, device=None,
          progress=True, callback=None, stop_at=None):
    """Train a ContextUnet on the sprites. Returns the list of per-step losses (whole run).

    Writes to out_dir: checkpoint.pt (model, EMA, optimiser, step, data-sampler and RNG state),
    history.json (loss per step), ema.pt (final EMA weights) and snap_<step>.pt snapshots.
    With resume=True an interrupted run continues from checkpoint.pt and ends in the same state
    as an uninterrupted one (config.steps may differ from the checkpoint's: the run then ends at
    the new length, with the learning-rate schedule re-planned from the current step). minutes (a
    time budget) or stop_at (a step) stops early, after saving a checkpoint, so a run can be split
    over sessions.
    callback(step, loss) is called after each step (a notebook's live loss plot).
    A LOCK file (see RunLock) keeps a second training out of out_dir while this one runs.
    """
    with RunLock(out_dir):
        return _train(config, Path(out_dir), data_path, resume, minutes, device, progress, callback, stop_at)


def _train(config, out_dir, data_path, resume, minutes, device, progress, callback, stop_at):
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else get_device()
    amp_dtype, mem_format = fast_settings(device)
    images, labels, _ = load_sprites(data_path)
    alpha = np.load(_resolve_data_path(data_path))["alpha"]
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 16, 16)
    a_all = torch.from_numpy(alpha)[:, None].contiguous()
    c_all = one_hot(torch.from_numpy(labels), 5)
    weights = torch.from_numpy(class_sampling_weights(labels, config.class_balance))

    torch.manual_seed(config.seed)
    schedule = make_schedule(config.timesteps).to(device)
    model = ContextUnet(n_feat=config.n_feat, norm=config.norm, prediction=config.prediction,
                        zero_init=config.zero_init).to(device, memory_format=mem_format)
    ema = EMA(model, config.ema_decay, config.ema_warmup)
    loss_options = {"snr_gamma": config.snr_gamma, "input_perturbation": config.input_perturbation,
                    "t_probs": (None if config.t_sampling == "uniform"
                                else timestep_probabilities(schedule.to("cpu"), config.t_sampling))}
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)  # drives batches, t, noise and dropout
    step, history, seconds = 0, [], 0.0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        # Only the length may change on resume (to train longer or stop sooner); the learning-rate
        # schedule is then re-planned from the current step.
        if {**ck["config"], "steps": config.steps} != config.__dict__:
            raise ValueError(f"--resume: checkpoint was made with a different config:\n{ck['config']}\n"
                             f"vs now\n{config.__dict__}")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["rng"]["torch"])
        step, history, seconds = ck["step"], list(ck["history"]), ck.get("train_seconds", 0.0)
    t_start = time.time() - seconds

    def save_checkpoint():
        save_atomic({"config": config.__dict__, "model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": opt.state_dict(), "generator": gen.get_state(), "rng": {"torch": torch.get_rng_state()},
                     "step": step, "history": history, "train_seconds": time.time() - t_start}, ckpt_path)
        (out_dir / "history.json").write_text(json.dumps({"loss": history, "train_seconds": time.time() - t_start,
                                                          "device": describe_device(device)}))

    deadline = time.time() + 60 * minutes if minutes is not None else None
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="training", mininterval=2)
    while step < config.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config.steps, config.lr, config.lr_min, config.warmup)
        idx = torch.multinomial(weights, config.batch_size, replacement=True, generator=gen)
        x = augment_batch(x_all[idx], a_all[idx], flip=config.flip, jitter=config.jitter, generator=gen)
        x = x.to(device).contiguous(memory_format=mem_format)
        c = c_all[idx].to(device)
        loss = train_step(model, opt, x, c, schedule, config.drop_prob, gen, amp_dtype, **loss_options)
        ema.update(model)
        step += 1
        history.append(loss)
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-200:]):.4f}")
        if callback is not None:
            callback(step, loss)
        if step in config.snapshot_steps:
            save_atomic({**weights_file(ema.model, half=True), "step": step, "train_seconds": time.time() - t_start},
                        out_dir / f"snap_{step:06d}.pt")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint()
        if step < config.steps and ((deadline is not None and time.time() > deadline) or step == stop_at):
            save_checkpoint()
            break
    bar.close()
    if step >= config.steps:
        save_atomic(weights_file(ema.model), out_dir / "ema.pt")
    return history


def model_args(model):
    """The constructor arguments that rebuild a ContextUnet's architecture (saved beside its weights)."""
    return {"in_channels": model.in_channels, "n_feat": model.n_feat, "n_cfeat": model.n_cfeat,
            "height": model.h, "norm": "group" if any(isinstance(m, nn.GroupNorm) for m in model.down1.modules())
            else "batch", "prediction": model.prediction}


def weights_file(model, half=False):
    """What ema.pt and snapshots hold: {"model_args": ..., "state_dict": ...}; half=True stores floats
    as fp16 (half the file size, the same samples)."""
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return {"model_args": model_args(model), "state_dict": state}


# ---------------------------------------------------------------------------------------------
# 5. Samplers
# ---------------------------------------------------------------------------------------------

def denoise_add_noise(x, t, pred_noise, schedule, z=None):
    """One DDPM ancestral step, x_t -> x_{t-1} (Ho et al. 2020, Algorithm 2, with sigma_t^2 = beta_t).

    x_{t-1} = (x_t - pred_noise * b_t / sqrt(1 - ab_t)) / sqrt(a_t) + sqrt(b_t) * z.
    x, pred_noise: (B, C, H, W); t: int or LongTensor (B,) in 1..T; z: the fresh noise, drawn when
    None (pass zeros for the last step, or everywhere for the "incorrect" sampler).
    """
    _check_images(x)
    if pred_noise.shape != x.shape:
        raise ValueError(f"pred_noise must have the shape of x, {tuple(x.shape)}, got {tuple(pred_noise.shape)}")
    t = _timestep_tensor(t, x.shape[0], schedule, low=1)
    if z is None:
        z = torch.randn_like(x)
    b, a, ab = (_at(v, t, x) for v in (schedule.b_t, schedule.a_t, schedule.ab_t))
    mean = (x - pred_noise * (1 - a) / (1 - ab).sqrt()) / a.sqrt()
    return mean + b.sqrt() * z


def denoise_ddim(x, t, t_prev, pred_noise, schedule, eta=0.0, z=None):
    """One DDIM step, x_t -> x_{t_prev} with t_prev < t (Song et al. 2020, eq. 12; sigma from eq. 16).

    x0 = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)
    x_{t_prev} = sqrt(ab_prev) * x0 + sqrt(1 - ab_prev - sigma^2) * eps + sigma * z,
    sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev).
    eta=0 is deterministic; eta=1 matches DDPM's posterior variance. t in 1..T, t_prev in 0..t-1.
    """
    _check_images(x)
    if pred_noise.shape != x.shape:
        raise ValueError(f"pred_noise must have the shape of x, {tuple(x.shape)}, got {tuple(pred_noise.shape)}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    B = x.shape[0]
    t = _timestep_tensor(t, B, schedule, "t", low=1)
    t_prev = _timestep_tensor(t_prev, B, schedule, "t_prev", low=0)
    if bool((t_prev >= t).any()):
        raise ValueError("t_prev must be smaller than t (DDIM steps go from noise towards the image)")
    ab, ab_prev = _at(schedule.ab_t, t, x), _at(schedule.ab_t, t_prev, x)
    x0 = (x - (1 - ab).sqrt() * pred_noise) / ab.sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    direction = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * pred_noise
    out = ab_prev.sqrt() * x0 + direction
    if eta > 0:
        if z is None:
            z = torch.randn_like(x)
        out = out + sigma * z
    return out


def _model_device(model):
    return next(model.parameters()).device


def _prepare_context(context, n_sample, model, guide_w):
    """Contexts as a float (n_sample, n_cfeat) tensor on the model's device, or None."""
    n_cfeat = model.n_cfeat
    if context is not None:
        context = torch.as_tensor(context)
        if not context.is_floating_point():
            context = one_hot(context, n_cfeat)
        if context.dim() == 1 and context.shape[0] == n_cfeat:
            context = context.expand(n_sample, n_cfeat)
        if context.shape != (n_sample, n_cfeat):
            raise ValueError(f"context must be class ids ({n_sample},) or contexts ({n_sample}, {n_cfeat}), "
                             f"got {tuple(context.shape)}")
        context = context.float().to(_model_device(model))
    if not guide_w >= 0:
        raise ValueError(f"guide_w must be >= 0, got {guide_w}")
    if guide_w > 0 and context is None:
        raise ValueError("classifier-free guidance (guide_w > 0) needs a context to steer towards")
    return context


def predict_noise(model, x, t, schedule, context=None, guide_w=0.0, amp_dtype=None):
    """The network's noise estimate at integer step t, with classifier-free guidance.

    eps = (1 + w) * eps(x, c) - w * eps(x, zero context); w = 0 is the plain conditional estimate.
    Both passes run as one batch. A v-predicting model's output is turned into eps first:
    eps = sqrt(ab_t) * v + sqrt(1 - ab_t) * x_t (substitute x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
    into v's definition). amp_dtype=torch.bfloat16 runs the network under autocast (faster on CPUs
    with native bf16); the sampler's own arithmetic stays fp32.
    """
    B = x.shape[0]
    tt = torch.full((B,), t / schedule.T, device=x.device, dtype=x.dtype)
    with autocast_context(x.device, amp_dtype):
        if guide_w == 0:
            out = model(x, tt, context).float()
        else:
            both = model(torch.cat([x, x]), torch.cat([tt, tt]),
                         torch.cat([context, torch.zeros_like(context)])).float()
            out = (1 + guide_w) * both[:B] - guide_w * both[B:]  # linear, so the same in v or eps
    if getattr(model, "prediction", "eps") == "v":
        ab = schedule.ab_t[t].to(x.device)
        out = ab.sqrt() * out + (1 - ab).sqrt() * x
    return out


def _check_sampler_args(model, n_sample, schedule):
    if not isinstance(n_sample, int) or n_sample < 1:
        raise ValueError(f"n_sample must be a positive integer, got {n_sample!r}")
    if not isinstance(model, ContextUnet):
        raise ValueError(f"model must be a ContextUnet, got {type(model).__name__}")


class _EvalMode:
    """Put a model in eval mode for sampling and restore its mode afterwards."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _randn(shape, generator, device):
    """Standard normal noise from a seeded CPU generator (same numbers on every device) or the global RNG."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


@torch.no_grad()
def sample_ddpm(model, n_sample, schedule, context=None, guide_w=0.0, save_rate=20, generator=None,
                add_noise=True, progress=False, amp_dtype=None):
    """Generate n_sample images with the full DDPM reverse process (T network calls).

    Returns (samples, intermediates): samples (n_sample, 3, H, W) float in about [-1, 1];
    intermediates a numpy array (frames, n_sample, 3, H, W): x_T, then x_t for every t divisible
    by save_rate and the last few steps, ending with the final samples.
    context: None, class ids (n_sample,), or contexts (n_sample, n_cfeat); guide_w: guidance weight.
    generator: a seeded torch.Generator (on the CPU) for reproducible samples.
    add_noise=False never re-injects noise: the course's "incorrect" sampler (see sample_ddpm_incorrect).
    progress shows a tqdm bar; amp_dtype as in predict_noise.
    """
    from tqdm.auto import tqdm

    _check_sampler_args(model, n_sample, schedule)
    if not isinstance(save_rate, int) or save_rate < 1:
        raise ValueError(f"save_rate must be a positive integer, got {save_rate!r}")
    device = _model_device(model)
    schedule = schedule.to(device)
    context = _prepare_context(context, n_sample, model, guide_w)
    shape = (n_sample, model.in_channels, model.h, model.h)
    x = _randn(shape, generator, device)
    frames = [x.cpu().numpy()]
    with _EvalMode(model):
        for t in tqdm(range(schedule.T, 0, -1), disable=not progress, desc="DDPM", mininterval=1):
            eps = predict_noise(model, x, t, schedule, context, guide_w, amp_dtype)
            z = _randn(shape, generator, device) if (add_noise and t > 1) else torch.zeros_like(x)
            x = denoise_add_noise(x, t, eps, schedule, z)
            if (t - 1) % save_rate == 0 or t - 1 < 8:
                frames.append(x.cpu().numpy())
    return x, np.stack(frames)


def sample_ddpm_incorrect(model, n_sample, schedule, context=None, save_rate=20, generator=None):
    """DDPM without the fresh noise at each step: the mean of every step, never a sample.

    The lesson: the network was trained on x_t that carry the right amount of noise; without it the
    images drift off that distribution and collapse to smooth, similar blobs. Same returns as sample_ddpm.
    """
    return sample_ddpm(model, n_sample, schedule, context, 0.0, save_rate, generator, add_noise=False)


def ddim_timesteps(T, n_steps):
    """The n_steps + 1 timesteps DDIM visits, from T down to 0, spaced as evenly as integers allow.

    Works for every n_steps in 1..T; e.g. T=500, n_steps=3 gives [500, 333, 167, 0].
    """
    if not isinstance(n_steps, (int, np.integer)) or not 1 <= n_steps <= T:
        raise ValueError(f"n_steps must be an integer in 1..{T} (the number of network calls), got {n_steps!r}")
    return [int(round(T - T * i / n_steps)) for i in range(n_steps + 1)]


@torch.no_grad()
def sample_ddim(model, n_sample, schedule, n_steps=25, eta=0.0, context=None, guide_w=0.0, generator=None,
                progress=False, amp_dtype=None):
    """Generate n_sample images with DDIM in n_steps network calls (any n_steps in 1..T).

    Returns (samples, intermediates) like sample_ddpm; intermediates has n_steps + 1 frames (x_T and
    the result of every step). eta=0 is deterministic given the starting noise; eta=1 adds DDPM-like
    noise. context, guide_w, generator, progress and amp_dtype as in sample_ddpm.
    """
    from tqdm.auto import tqdm

    _check_sampler_args(model, n_sample, schedule)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    steps = ddim_timesteps(schedule.T, n_steps)
    device = _model_device(model)
    schedule = schedule.to(device)
    context = _prepare_context(context, n_sample, model, guide_w)
    shape = (n_sample, model.in_channels, model.h, model.h)
    x = _randn(shape, generator, device)
    frames = [x.cpu().numpy()]
    with _EvalMode(model):
        for t, t_prev in tqdm(list(zip(steps[:-1], steps[1:])), disable=not progress, desc="DDIM"):
            eps = predict_noise(model, x, t, schedule, context, guide_w, amp_dtype)
            z = _randn(shape, generator, device) if eta > 0 else None
            x = denoise_ddim(x, t, t_prev, eps, schedule, eta, z)
            frames.append(x.cpu().numpy())
    return x, np.stack(frames)


# ---------------------------------------------------------------------------------------------
# 6. Data
# ---------------------------------------------------------------------------------------------

CLASS_NAMES = ["hero", "non-hero", "food", "spell", "item"]


def _resolve_data_path(path):
    """A relative path that does not exist from here is looked up beside this module (notebooks/ runs)."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (ROOT / path).exists():
        path = ROOT / path
    if not path.exists():
        raise FileNotFoundError(
            f"sprite file not found: {path}. It ships with the course as data/sprites16.npz; "
            "clone the whole repository, or rebuild it with `bash data/download_crawl.sh && "
            "python data/build_sprites.py`.")
    return path


def load_sprites(path="data/sprites16.npz"):
    """The sprite dataset: (images, labels, class_names).

    images: uint8 (N, 16, 16, 3) RGB on white; labels: int64 (N,) in 0..4;
    class_names: list of 5 str (hero, non-hero, food, spell, item).
    """
    with np.load(_resolve_data_path(path)) as d:
        return d["images"], d["labels"].astype(np.int64), [str(s) for s in d["class_names"]]


def to_tensor_images(images):
    """uint8 (N, H, W, 3) in 0..255 -> float (N, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def _hue_rotation(angle):
    """(B, 3, 3) matrices that rotate RGB colours about the grey axis by angle (radians, (B,))."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    k = 1 / 3
    r = math.sqrt(k)
    m = torch.empty(len(angle), 3, 3)
    # Rodrigues' rotation about the unit vector (1, 1, 1)/sqrt(3).
    for i in range(3):
        for j in range(3):
            cross = 0.0 if i == j else (r if (j - i) % 3 == 2 else -r)
            m[:, i, j] = cos * (1.0 if i == j else 0.0) + k * (1 - cos) + sin * cross
    return m


def augment_batch(images, alpha=None, flip=True, jitter=0.0, generator=None):
    """Random flips and colour jitter for a batch of sprites; returns float (B, 3, H, W) in [-1, 1].

    images: uint8 (B, 3, H, W); alpha: uint8 (B, 1, H, W) sprite coverage, needed for jitter.
    flip: mirror left-right with probability 0.5. jitter in [0, 1]: hue rotation up to jitter*30
    degrees, saturation and brightness scaled by up to 1 +- jitter*0.2 (jitter=0.3 is mild). The
    jitter is applied to the sprite's own colour, recovered with alpha, and composited back on white,
    so the background stays exactly white.
    """
    x = images.float() / 255.0
    B = x.shape[0]
    if jitter > 0:
        if alpha is None:
            raise ValueError("colour jitter needs the sprites' alpha channel to keep the background white")
        a = alpha.float() / 255.0
        colour = ((x - (1 - a)) / a.clamp(min=1e-3)).clamp(0, 1)  # undo "over white"
        u = torch.rand(B, 3, generator=generator) * 2 - 1
        rot = _hue_rotation(u[:, 0] * jitter * math.pi / 6)
        colour = torch.einsum("bij,bjhw->bihw", rot, colour)
        grey = colour.mean(1, keepdim=True)
        colour = grey + (colour - grey) * (1 + 0.2 * jitter * u[:, 1]).view(B, 1, 1, 1)
        colour = (colour * (1 + 0.2 * jitter * u[:, 2]).view(B, 1, 1, 1)).clamp(0, 1)
        x = a * colour + (1 - a)
    if flip:
        mirror = torch.rand(B, generator=generator) < 0.5
        x = torch.where(mirror.view(B, 1, 1, 1), x.flip(-1), x)
    return x * 2 - 1


class SpriteDataset(Dataset):
    """The sprites as a torch Dataset of (image (3, 16, 16) float in [-1, 1], one-hot context (5,)).

    augment=True applies a random horizontal flip and, with jitter > 0, a mild colour jitter of the
    sprite only (see augment_batch). indices selects a subset (e.g. a train/test split).
    """

    def __init__(self, path="data/sprites16.npz", augment=False, jitter=0.0, indices=None):
        with np.load(_resolve_data_path(path)) as d:
            images, labels, alpha = d["images"], d["labels"].astype(np.int64), d["alpha"]
            self.class_names = [str(s) for s in d["class_names"]]
        if indices is not None:
            images, labels, alpha = images[indices], labels[indices], alpha[indices]
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.alpha = torch.from_numpy(alpha)[:, None].contiguous()
        self.labels = torch.from_numpy(labels)
        self.augment, self.jitter = augment, jitter

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        i = int(i)
        x = augment_batch(self.images[i:i + 1], self.alpha[i:i + 1], flip=self.augment,
                          jitter=self.jitter if self.augment else 0.0)[0]
        return x, one_hot(self.labels[i:i + 1], len(self.class_names))[0]


# ---------------------------------------------------------------------------------------------
# 7. Pictures
# ---------------------------------------------------------------------------------------------

def to_display(x):
    """Images in [-1, 1] -> numpy float (..., H, W, 3) in [0, 1], faithfully: (x + 1) / 2, clipped.

    (The course stretched each channel of each image to its own min..max, which distorts colours
    and divides by zero on a flat channel.) Accepts (B, 3, H, W) or (3, H, W), tensor or numpy.
    """
    x = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    return np.clip((np.moveaxis(x, -3, -1) + 1) / 2, 0, 1)


def image_grid(x, nrow=8, pad=1, pad_value=1.0):
    """A batch (B, 3, H, W) in [-1, 1] as one numpy (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) image in [0, 1]."""
    imgs = to_display(x)
    if imgs.ndim != 4:
        raise ValueError(f"image_grid needs a batch (B, 3, H, W), got shape {imgs.shape[:-1]}")
    B, H, W, _ = imgs.shape
    ncol = min(nrow, B)
    nrows = math.ceil(B / ncol)
    grid = np.full((nrows * (H + pad) + pad, ncol * (W + pad) + pad, 3), pad_value, np.float32)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = imgs[i]
    return grid


def show_images(x, nrow=8, title=None, scale=0.6, ax=None):
    """Show a batch (B, 3, H, W) in [-1, 1] as a grid, pixels kept sharp. Returns the Axes."""
    import matplotlib.pyplot as plt

    grid = image_grid(x, nrow)
    if ax is None:
        _, ax = plt.subplots(figsize=(scale * grid.shape[1] / 17 * 1.0 + 0.2, scale * grid.shape[0] / 17 + 0.2))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def save_grid_png(x, path, nrow=8, scale=4):
    """Write a batch (B, 3, H, W) in [-1, 1] as a PNG grid, each pixel scale x scale."""
    from PIL import Image

    grid = (image_grid(x, nrow) * 255).round().astype(np.uint8)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def plot_sample(intermediates, nrow=8, interval=200, scale=0.6, titles=None):
    """A matplotlib FuncAnimation of a denoising trajectory, one grid per frame.

    intermediates: (frames, B, 3, H, W) in [-1, 1], as returned by sample_ddpm / sample_ddim.
    titles: optional list of one caption per frame (e.g. the timestep). Show it in a notebook with
    animation_html(ani), or save it with save_gif(ani, path).
    """
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation

    frames = np.asarray(intermediates)
    if frames.ndim != 5:
        raise ValueError(f"intermediates must have shape (frames, B, 3, H, W), got {frames.shape}")
    grids = [image_grid(f, nrow) for f in frames]
    h, w = grids[0].shape[:2]
    fig, ax = plt.subplots(figsize=(scale * w / 17 + 0.2, scale * h / 17 + 0.5))
    im = ax.imshow(grids[0], interpolation="nearest")
    ax.set_axis_off()
    label = ax.set_title(titles[0] if titles else "")

    def update(i):
        im.set_data(grids[i])
        if titles:
            label.set_text(titles[i])
        return (im, label)

    ani = FuncAnimation(fig, update, frames=len(grids), interval=interval, blit=False, repeat=True)
    plt.close(fig)  # the animation is shown as HTML; this stops a stray static figure
    return ani


def animation_html(ani):
    """An animation as inline HTML with play controls (no ffmpeg needed); display() it in Jupyter."""
    from IPython.display import HTML

    return HTML(ani.to_jshtml())


def save_gif(ani, path, fps=5):
    """Save an animation as a GIF with Pillow. Returns the path."""
    from matplotlib.animation import PillowWriter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ani.save(path, writer=PillowWriter(fps=fps), dpi=100)
    return path


# ---------------------------------------------------------------------------------------------
# 8. Devices and weights
# ---------------------------------------------------------------------------------------------

def get_device():
    """The best available device: cuda, then Apple's mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device):
    """A short description of the hardware, for manifests and benchmark tables."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform
        name = platform.processor() or name
    bf16 = ", native bf16" if cpu_supports_bf16() else ""
    return f"{name}, {torch.get_num_threads()} threads{bf16}"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state(path, device="cpu"):
    """A state_dict from a file, loaded safely (weights_only=True), floats as fp32."""
    return read_weights(path, device)[0]


def read_weights(path, device="cpu"):
    """(state_dict with floats as fp32, model_args dict or {}) from a weights file or a training checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}. The course's weights ship in weights/ "
                                "of the repository; clone it whole, or train your own with "
                                "`python diffusion_utilities.py train`.")
    state, args = torch.load(path, map_location=device, weights_only=True), {}
    if isinstance(state, dict) and "model" in state and "ema" in state:  # a training checkpoint
        cfg = state.get("config", {})
        args = {k: cfg[k] for k in ("n_feat", "norm", "prediction") if k in cfg}
        state = state["ema"]["model"]
    elif isinstance(state, dict) and "state_dict" in state:  # ema.pt, a snapshot
        state, args = state["state_dict"], state.get("model_args", {})
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, args


def load_model(path, device=None, **model_args):
    """A ContextUnet with weights from path, in eval mode on device (default: get_device()).

    The architecture is read from the file when it records one (ema.pt, snapshots, checkpoints);
    model_args (n_feat, n_cfeat, height, norm, prediction) override it, e.g. for a bare state_dict.
    """
    device = torch.device(device) if device is not None else get_device()
    state, saved = read_weights(path, device)
    model = ContextUnet(**{**saved, **model_args})
    model.load_state_dict(state)
    return model.to(device).eval()


def read_manifest(weights_dir=WEIGHTS_DIR):
    """weights/manifest.json as a dict: name -> entry (file, sha256, kind, how it was made, metrics)."""
    path = Path(weights_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no weights manifest at {path}; the shipped weights live in weights/ of the "
                                "repository (clone it whole)")
    return json.loads(path.read_text())["weights"]


def add_to_manifest(name, file, kind="ContextUnet", weights_dir=WEIGHTS_DIR, **info):
    """Record (or update) a weights file in weights/manifest.json with its sha256 and how it was made.

    kind: "ContextUnet" or "classifier"; info: e.g. args (constructor arguments), command, seed,
    train_minutes, hardware, metrics.
    """
    weights_dir = Path(weights_dir)
    path = weights_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"weights": {}}
    manifest["weights"][name] = {"file": str(file), "sha256": sha256_file(weights_dir / file), "kind": kind, **info}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return manifest["weights"][name]


def load_pretrained(name="sprites", device=None, weights_dir=WEIGHTS_DIR):
    """A shipped model, ready to use in eval mode: name is a key of weights/manifest.json.

    "sprites" is the main sprite model (EMA weights); "sprites_step000250" and similar are snapshots
    from early in its training; "classifier" is the SpriteClassifier the metrics use. The file's
    sha256 is checked against the manifest first, and a mismatch is refused.
    """
    manifest = read_manifest(weights_dir)
    if name not in manifest:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(sorted(manifest))}")
    entry = manifest[name]
    path = Path(weights_dir) / entry["file"]
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} is listed in the manifest but missing; "
                                "restore it with `git checkout -- weights/`")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"weights file {path} does not match its manifest (sha256 {digest[:12]}..., expected "
                         f"{entry['sha256'][:12]}...): it was changed or damaged. Restore it with "
                         "`git checkout -- weights/` or re-download the repository.")
    device = torch.device(device) if device is not None else get_device()
    if entry["kind"] == "classifier":
        model = SpriteClassifier(**entry.get("args", {}))
        model.load_state_dict(load_state(path, device))
        return model.to(device).eval()
    return load_model(path, device, **entry.get("args", {}))


# ---------------------------------------------------------------------------------------------
# 9. Metrics: how good are the samples?
# ---------------------------------------------------------------------------------------------

class SpriteClassifier(nn.Module):
    """A small CNN that tells the 5 sprite classes apart; its penultimate layer (128 features)
    is the feature space for sprite-FID and KID (Inception weights cannot be downloaded at run
    time, and a network trained on our 16x16 sprites judges them more sharply).

    forward(x) with x (B, 3, 16, 16) in [-1, 1] -> logits (B, n_classes); features(x) -> (B, 128).
    """

    def __init__(self, n_classes=5, width=32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.GELU())

        w = width
        self.body = nn.Sequential(block(3, w), block(w, w), nn.MaxPool2d(2),
                                  block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
                                  block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, n_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def split_indices(labels, test_fraction=0.15, seed=0):
    """A stratified train/test split of sprite indices: (train_idx, test_idx), both sorted."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test.extend(idx[:max(1, int(round(test_fraction * len(idx))))])
    test = np.sort(np.array(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def train_classifier(images, labels, epochs=30, batch_size=64, lr=2e-3, seed=0, progress=True):
    """Train a SpriteClassifier on uint8 images (N, 16, 16, 3) with labels (N,). Returns it in eval mode.

    Flips and a little Gaussian noise as augmentation, and a class-weighted loss so the rare food
    class counts.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).contiguous()
    y_all = torch.as_tensor(labels).long()
    counts = torch.bincount(y_all, minlength=5).float()
    class_w = (counts.sum() / (len(counts) * counts.clamp(min=1)))
    model = SpriteClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n_batches = math.ceil(len(y_all) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * n_batches)
    model.train()
    for _ in tqdm(range(epochs), disable=not progress, desc="classifier"):
        perm = torch.randperm(len(y_all), generator=gen)
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = augment_batch(x_all[idx], flip=True, generator=gen)
            x = x + 0.05 * torch.randn(x.shape, generator=gen)  # robustness to slightly noisy samples
            loss = F.cross_entropy(model(x), y_all[idx], weight=class_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classifier_outputs(classifier, x, batch_size=500):
    """(features (N, 128) float64 numpy, predicted class (N,) numpy) for images x (N, 3, 16, 16) in [-1, 1]."""
    classifier.eval()
    dev = next(classifier.parameters()).device
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(dev).float().clamp(-1, 1)
        f = classifier.features(xb)
        feats.append(f.double().cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def frechet_distance(feats_a, feats_b):
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): the "FID" formula.

    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the trace of the matrix square root
    taken from the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so numpy's eigh is enough).
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature arrays (N, D) with the same D and N >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def kernel_inception_distance(feats_a, feats_b, n_subsets=50, subset_size=500, seed=0):
    """KID: the unbiased squared MMD with kernel k(x, y) = (x.y / D + 1)^3, averaged over random
    subsets. Returns (mean, std). Unlike FID it has no bias at small n, so numbers at different n
    compare; the real-vs-real value is about 0.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    vals = []
    for _ in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = m * (m - 1)
        vals.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def nearest_neighbours(samples, train_images):
    """For each sample, its nearest training sprite (flips included, as the model trains on flips).

    samples: (N, 3, H, W) in [-1, 1]; train_images: uint8 (M, H, W, 3).
    Returns (index (N,) into train_images, rms distance (N,) in [0, 1] pixel units, flipped (N,) bool).
    """
    s = torch.as_tensor(to_display(samples)).reshape(len(samples), -1).double()
    t = torch.as_tensor(np.asarray(train_images)).double() / 255.0
    both = torch.cat([t.reshape(len(t), -1), t.flip(2).reshape(len(t), -1)])
    d2 = torch.cdist(s, both).pow(2) / s.shape[1]
    best = d2.argmin(1)
    return (best % len(t)).numpy(), d2.gather(1, best[:, None])[:, 0].sqrt().numpy(), (best >= len(t)).numpy()



NEAR_COPY_RMS = 0.06  # rms pixel difference (0..1 scale) below which a sample counts as a near-copy


def generate(model, schedule, labels, sampler="ddim", n_steps=25, eta=0.0, guide_w=0.0, seed=0,
             batch_size=250, amp_dtype=None, progress=True):
    """Samples for the given class ids (N,), in batches: (images (N, 3, H, W) on the CPU, seconds)."""
    from tqdm.auto import tqdm

    labels = torch.as_tensor(labels).long()
    gen = torch.Generator().manual_seed(seed)
    out, t0 = [], time.time()
    for i in tqdm(range(0, len(labels), batch_size), disable=not progress,
                  desc=f"{sampler}-{n_steps if sampler == 'ddim' else schedule.T} w={guide_w}"):
        lab = labels[i:i + batch_size]
        if sampler == "ddpm":
            x, _ = sample_ddpm(model, len(lab), schedule, lab, guide_w, save_rate=schedule.T, generator=gen,
                               amp_dtype=amp_dtype)
        else:
            x, _ = sample_ddim(model, len(lab), schedule, n_steps, eta, lab, guide_w, gen, amp_dtype=amp_dtype)
        out.append(x.cpu())
    return torch.cat(out), time.time() - t0


def evaluate(model, classifier, schedule, images, labels, test_idx, n=1000, seed=0, guide_ws=(0, 1, 2, 4),
             ddim_steps=(10, 25, 50, 100), etas=(0.0, 1.0), per_class=100, guide_steps=25, amp_dtype=None,
             progress=True, snapshots=None):
    """All the quality numbers of the shipped model, as a dict (see `python diffusion_utilities.py evaluate`).

    images, labels: the whole sprite set (uint8 (N, 16, 16, 3), (N,)); test_idx: the classifier's
    held-out sprites. FID and KID compare n samples, made for the class ids of n random real sprites,
    with n other real sprites; the real-vs-real floor compares two disjoint sets of n real sprites.
    snapshots: optional {name: model} scored the same way with DDIM-{guide_steps} only (training progress).
    Returns (results dict, the DDPM samples, their nearest training sprites' indices and distances).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if 2 * n > len(labels):
        raise ValueError(f"n={n} is too large: the floor needs two disjoint sets of n real sprites "
                         f"(at most {len(labels) // 2})")
    perm = rng.permutation(len(labels))
    ref_idx, other_idx = perm[:n], perm[n:2 * n]
    real_ref, _ = classifier_outputs(classifier, to_tensor_images(images[ref_idx]))
    real_other, _ = classifier_outputs(classifier, to_tensor_images(images[other_idx]))
    gen_labels = labels[other_idx]  # the same class mix as the real sets
    res = {"n": n, "seed": seed, "amp_dtype": str(amp_dtype), "near_copy_rms": NEAR_COPY_RMS,
           "guide_steps": guide_steps}
    res["floor"] = {"fid": frechet_distance(real_other, real_ref),
                    "kid": kernel_inception_distance(real_other, real_ref)[0]}
    _, test_pred = classifier_outputs(classifier, to_tensor_images(images[test_idx]))
    test_lab = labels[test_idx]
    res["classifier_test_accuracy"] = {
        "all": float((test_pred == test_lab).mean()),
        **{CLASS_NAMES[c]: float((test_pred[test_lab == c] == c).mean()) for c in range(len(CLASS_NAMES))}}

    def score(x):
        f, pred = classifier_outputs(classifier, x)
        kid = kernel_inception_distance(f, real_ref)[0]
        return {"fid": frechet_distance(f, real_ref), "kid": kid, "accuracy": float((pred == gen_labels).mean())}

    samplers = [("ddpm", schedule.T, 1.0, amp_dtype)] + [("ddim", k, e, amp_dtype) for e in etas for k in ddim_steps]
    if amp_dtype is not None:  # one row in plain fp32, to show that autocast does not change the quality
        samplers.append(("ddim", guide_steps, 0.0, None))
    res["samplers"] = []
    for name, steps, eta, amp in samplers:
        x, secs = generate(model, schedule, gen_labels, name, steps, eta, 0.0, seed, amp_dtype=amp,
                           progress=progress)
        row = {"sampler": name, "steps": steps, "eta": eta, "autocast": str(amp), "s_per_sample": secs / n, **score(x)}
        res["samplers"].append(row)
        if name == "ddpm":
            ddpm_samples = x
    idx, dist, _ = nearest_neighbours(ddpm_samples, images)
    res["memorisation"] = {"sampler": "ddpm", "median_rms": float(np.median(dist)),
                           "near_copy_fraction": float((dist < NEAR_COPY_RMS).mean())}
    balanced = np.repeat(np.arange(len(CLASS_NAMES)), per_class)
    res["guidance"] = []
    for w in guide_ws:
        x, _ = generate(model, schedule, gen_labels, "ddim", guide_steps, 0.0, w, seed, amp_dtype=amp_dtype,
                        progress=progress)
        xb, _ = generate(model, schedule, balanced, "ddim", guide_steps, 0.0, w, seed + 1, amp_dtype=amp_dtype,
                         progress=progress)
        _, pred = classifier_outputs(classifier, xb)
        res["guidance"].append({"guide_w": w, **score(x), "class_accuracy": {
            CLASS_NAMES[c]: float((pred[balanced == c] == c).mean()) for c in range(len(CLASS_NAMES))},
            "balanced_accuracy": float((pred == balanced).mean())})
    res["snapshots"] = {}
    for name, snap in (snapshots or {}).items():
        x, _ = generate(snap, schedule, gen_labels, "ddim", guide_steps, 0.0, 0.0, seed, amp_dtype=amp_dtype,
                        progress=progress)
        res["snapshots"][name] = score(x)
    return res, ddpm_samples, idx, dist


def metrics_markdown(res, command):
    """The evaluation dict as the markdown tables written to weights/metrics.md."""
    fl = res["floor"]
    lines = [f"# Quality of the shipped sprite model", "",
             f"Reproduce: `{command}`", "",
             f"FID and KID: on the 128 penultimate features of the project's SpriteClassifier, n = {res['n']} "
             f"samples (class mix of the real data, guidance w = 0 unless stated) against n = {res['n']} real "
             f"sprites. Real-vs-real floor at the same n: **FID {fl['fid']:.2f}**, KID {fl['kid']:.4f}. "
             f"Network run with autocast dtype {res['amp_dtype']}.", "",
             "## Samplers", "",
             "| sampler | steps | eta | autocast | s / sample | sprite-FID | FID / floor | KID | class accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["samplers"]:
        lines.append(f"| {r['sampler'].upper()} | {r['steps']} | {r['eta']:g} | {r['autocast']} | {r['s_per_sample']:.4f} | "
                     f"{r['fid']:.2f} | {r['fid'] / fl['fid']:.1f}x | {r['kid']:.4f} | {r['accuracy']:.1%} |")
    acc = res["classifier_test_accuracy"]
    lines += ["", f"## Classifier-free guidance (DDIM-{res['guide_steps']}, eta 0)", "",
              "Per-class accuracy: the classifier's verdict on " 
              "samples made for each class (balanced set), beside its accuracy on held-out real sprites.", "",
              "| guide_w | FID | KID | " + " | ".join(CLASS_NAMES) + " | mean |",
              "|---" * (4 + len(CLASS_NAMES)) + "|",
              "| real held-out | – | – | " + " | ".join(f"{acc[c]:.0%}" for c in CLASS_NAMES)
              + f" | {np.mean([acc[c] for c in CLASS_NAMES]):.0%} |"]
    for g in res["guidance"]:
        ca = g["class_accuracy"]
        lines.append(f"| {g['guide_w']:g} | {g['fid']:.2f} | {g['kid']:.4f} | "
                     + " | ".join(f"{ca[c]:.0%}" for c in CLASS_NAMES) + f" | {g['balanced_accuracy']:.0%} |")
    if res.get("snapshots"):
        lines += ["", f"## Training progress (DDIM-{res['guide_steps']}, eta 0, w = 0)", "",
                  "| model | sprite-FID | KID | class accuracy |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['fid']:.2f} | {v['kid']:.4f} | {v['accuracy']:.1%} |" for k, v in res["snapshots"].items()]
    m = res["memorisation"]
    lines += ["", "## Memorisation (DDPM-500 samples vs their nearest training sprite, flips included)", "",
              f"Median rms pixel distance {m['median_rms']:.3f} (0..1 scale); near-copies (rms < "
              f"{res['near_copy_rms']}): {m['near_copy_fraction']:.1%}. Pairs: `memorisation.png`.", ""]
    return "\n".join(lines)


def memorisation_figure(samples, dist, neighbour_idx, images, path, n_pairs=16):
    """A PNG of sample / nearest-training-sprite pairs: the closest half, then random ones."""
    order = np.argsort(dist)
    rng = np.random.default_rng(0)
    pick = np.concatenate([order[:n_pairs // 2], rng.choice(order[n_pairs // 2:], n_pairs - n_pairs // 2, False)])
    pairs = torch.stack([torch.stack([samples[i], to_tensor_images(images[neighbour_idx[i]][None])[0]])
                         for i in pick])  # (n_pairs, 2, 3, H, W)
    grid = pairs.permute(1, 0, 2, 3, 4).reshape(-1, *samples.shape[1:])  # row 1 samples, row 2 neighbours
    return save_grid_png(grid, path, nrow=n_pairs, scale=4)


# ---------------------------------------------------------------------------------------------
# 10. Command line
# ---------------------------------------------------------------------------------------------

def _cmd_train(args):
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         warmup=args.warmup, drop_prob=args.drop_prob, ema_decay=args.ema_decay,
                         ema_warmup=args.ema_warmup, n_feat=args.n_feat, norm=args.norm,
                         prediction=args.prediction, zero_init=args.zero_init, snr_gamma=args.snr_gamma or None,
                         t_sampling=args.t_sampling, input_perturbation=args.input_perturbation,
                         jitter=args.jitter, class_balance=args.class_balance,
                         snapshot_steps=sorted(args.snapshots), checkpoint_every=args.checkpoint_every)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    history = train(config, args.out, data_path=args.data, resume=args.resume, minutes=args.minutes,
                    device=args.device)
    print(f"{len(history)} of {config.steps} steps done; last-200 mean loss "
          f"{np.mean(history[-200:]):.4f}; this run took {(time.time() - t0) / 60:.1f} min; files in {args.out}")


def _cmd_sample(args):
    classes = [_class_id(c) for c in args.classes]
    device = torch.device(args.device) if args.device else get_device()
    model = load_model(args.weights, device) if args.weights else load_pretrained(args.model, device)
    schedule = make_schedule(500)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    gen = torch.Generator().manual_seed(args.seed)
    if args.sampler == "ddpm":
        x, frames = sample_ddpm(model, len(labels), schedule, labels, args.guide_w, generator=gen, progress=True)
    else:
        x, frames = sample_ddim(model, len(labels), schedule, args.steps, args.eta, labels, args.guide_w, gen,
                                progress=True)
    save_grid_png(x, args.out, nrow=args.per_class)
    print(f"wrote {args.out}")
    if args.gif:
        save_gif(plot_sample(frames, nrow=args.per_class), args.gif)
        print(f"wrote {args.gif}")


def _class_id(name):
    if name.isdigit() and int(name) < len(CLASS_NAMES):
        return int(name)
    if name not in CLASS_NAMES:
        raise SystemExit(f"unknown class {name!r}; choose from {', '.join(CLASS_NAMES)} (or 0..4)")
    return CLASS_NAMES.index(name)


def _destination(path, to_weights, command):
    """Where a command writes: path, or weights/ with --to-weights; a path inside weights/ needs the flag."""
    if to_weights:
        return WEIGHTS_DIR
    path = Path(path).resolve()
    if path == WEIGHTS_DIR or WEIGHTS_DIR in path.parents:
        raise SystemExit(f"{command}: {path} is inside the shipped weights/; pass --to-weights to replace "
                         "what ships, or choose another folder")
    return path


def _cmd_export(args):
    """Copy a finished run's EMA weights and snapshots into weights/ and record them in the manifest."""
    run, wdir = Path(args.run), _destination(args.weights_dir, args.to_weights, "export")
    hist = json.loads((run / "history.json").read_text())
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = ck["config"]
    if ck["step"] < cfg["steps"]:
        raise SystemExit(f"export: {run} stopped at step {ck['step']} of {cfg['steps']}; finish it first with "
                         f"`python diffusion_utilities.py train --out {run} --resume` (and the same settings)")
    made = {"command": args.command or f"python diffusion_utilities.py train --steps {cfg['steps']} --seed {cfg['seed']}",
            "seed": cfg["seed"], "config": cfg, "hardware": hist.get("device", "unknown"),
            "args": {k: cfg[k] for k in ("n_feat", "norm", "prediction") if k in cfg}}
    wdir.mkdir(parents=True, exist_ok=True)
    loss = np.asarray(hist["loss"])
    k = 50  # the loss curve the training lesson plots: means over blocks of 50 steps
    curve = [round(float(v), 5) for v in loss[: len(loss) // k * k].reshape(-1, k).mean(1)]
    (wdir / f"{args.name}_loss.json").write_text(json.dumps({"block": k, "mean_loss": curve}))
    save_atomic(load_state(run / "checkpoint.pt"), wdir / f"{args.name}.pt")
    minutes = args.train_minutes
    if minutes is None and "train_seconds" in ck:
        minutes = round(ck["train_seconds"] / 60, 1)
    add_to_manifest(args.name, f"{args.name}.pt", weights_dir=wdir, step=ck["step"],
                    train_minutes=minutes, **made)
    for snap in sorted(run.glob("snap_*.pt")):
        step = int(snap.stem.split("_")[1])
        name = f"{args.name}_step{step:06d}"
        save_atomic(torch.load(snap, map_location="cpu", weights_only=True), wdir / f"{name}.pt")
        add_to_manifest(name, f"{name}.pt", weights_dir=wdir, step=step,
                        note="EMA snapshot during the same run (fp16)", **made)
    print(f"exported {args.name} (step {ck['step']}) and {len(list(run.glob('snap_*.pt')))} snapshots to {wdir}")


def _cmd_train_classifier(args):
    images, labels, _ = load_sprites(args.data)
    train_idx, test_idx = split_indices(labels, seed=args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    clf = train_classifier(images[train_idx], labels[train_idx], epochs=args.epochs, seed=args.seed)
    _, pred = classifier_outputs(clf, to_tensor_images(images[test_idx]))
    acc = float((pred == labels[test_idx]).mean())
    out = WEIGHTS_DIR / "classifier.pt" if args.to_weights else Path(args.out)
    save_atomic(clf.state_dict(), out)
    if args.to_weights:
        add_to_manifest("classifier", "classifier.pt", "classifier", args={"n_classes": 5}, seed=args.seed,
                        command="python diffusion_utilities.py " + " ".join(args.argv),
                        train_minutes=round((time.time() - t0) / 60, 1), hardware=describe_device("cpu"),
                        metrics={"held_out_accuracy": round(acc, 3), "held_out_n": len(test_idx),
                                 "split": f"split_indices(labels, 0.15, seed={args.seed})"})
    print(f"wrote {out}: held-out accuracy {acc:.1%} on {len(test_idx)} sprites, "
          f"{time.time() - t0:.0f} s")


def _cmd_evaluate(args):
    out = _destination(args.out, args.to_weights, "evaluate")
    if args.to_weights and args.weights:
        raise SystemExit("evaluate: --to-weights records a shipped model's numbers; use --model NAME, not --weights")
    device = torch.device(args.device) if args.device else get_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.weights, device) if args.weights else load_pretrained(args.model, device)
    classifier = load_pretrained("classifier", device)
    images, labels, _ = load_sprites(args.data)
    _, test_idx = split_indices(labels, seed=0)
    amp_dtype = fast_settings(device)[0] if args.fast else None
    snapshots = {name: load_pretrained(name, device) for name in args.snapshots}
    res, samples, nn_idx, dist = evaluate(model, classifier, make_schedule(500), images, labels, test_idx,
                                          n=args.n, seed=args.seed, amp_dtype=amp_dtype,
                                          ddim_steps=tuple(args.ddim_steps), guide_ws=tuple(args.guide_ws),
                                          per_class=args.per_class, snapshots=snapshots)
    res["hardware"] = describe_device(device)
    command = "python diffusion_utilities.py " + " ".join(args.argv)
    res["command"] = command
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(res, indent=2))
    (out / "metrics.md").write_text(metrics_markdown(res, command.strip()))
    memorisation_figure(samples, dist, nn_idx, images, out / "memorisation.png")
    if args.to_weights:
        _record_metrics(res, args.model)
    print((out / "metrics.md").read_text())


def _record_metrics(res, model_name, weights_dir=WEIGHTS_DIR):
    """Write the headline numbers of an evaluation beside each evaluated file in the manifest."""
    manifest = read_manifest(weights_dir)
    ddpm = res["samplers"][0]
    headline = {"n": res["n"], "fid_floor": res["floor"]["fid"], "fid_ddpm500": ddpm["fid"], "kid_ddpm500": ddpm["kid"],
                "tables": "metrics.md"}
    ddim = next((r for r in res["samplers"] if r["sampler"] == "ddim" and r["steps"] == res["guide_steps"]
                 and r["eta"] == 0), None)
    if ddim is not None:
        headline.update(fid_ddim25=ddim["fid"], kid_ddim25=ddim["kid"], accuracy_ddim25=ddim["accuracy"])
    if res["guidance"]:
        best = max(res["guidance"], key=lambda g: g["balanced_accuracy"])
        headline.update(guided_accuracy=best["balanced_accuracy"], at_guide_w=best["guide_w"])
    metrics = {model_name: headline}
    metrics.update({k: {"n": res["n"], "fid_ddim25": v["fid"], "kid_ddim25": v["kid"], "accuracy_ddim25": v["accuracy"]}
                    for k, v in res["snapshots"].items()})
    for name, m in metrics.items():
        entry = {k: v for k, v in manifest[name].items() if k not in ("file", "sha256", "kind")}
        add_to_manifest(name, manifest[name]["file"], manifest[name]["kind"], weights_dir, **{**entry, "metrics": m})


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python diffusion_utilities.py",
                                 description="Train, sample from and evaluate the course's sprite diffusion model.")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a ContextUnet on the sprites (resumable)",
                        description="Train a conditional ContextUnet (context dropout, EMA, warm-up + cosine "
                                    "learning rate) on data/sprites16.npz. Writes checkpoint.pt, history.json, "
                                    "ema.pt and snapshots to --out.")
    tr.add_argument("--out", default="runs/sprites", help="output folder (default runs/sprites)")
    tr.add_argument("--steps", type=int, default=3300, help="total optimiser steps; sets the LR schedule")
    tr.add_argument("--minutes", type=float, default=None, help="stop after this many minutes (resume later)")
    tr.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--drop-prob", type=float, default=0.1, help="probability of training on the zero context")
    tr.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    tr.add_argument("--ema-decay", type=float, default=0.999)
    tr.add_argument("--ema-warmup", type=int, default=10, help="EMA decay ramps as (1 + n) / (this + n)")
    tr.add_argument("--n-feat", type=int, default=64)
    tr.add_argument("--norm", choices=["batch", "group"], default="batch")
    tr.add_argument("--prediction", choices=["eps", "v"], default="v", help="what the network predicts")
    tr.add_argument("--zero-init", action="store_true", help="start the output conv at zero")
    tr.add_argument("--snr-gamma", type=float, default=5.0,
                    help="Min-SNR-gamma loss weighting; 0 turns it off (plain MSE)")
    tr.add_argument("--t-sampling", choices=["uniform", "lognormal"], default="uniform")
    tr.add_argument("--input-perturbation", type=float, default=0.0)
    tr.add_argument("--jitter", type=float, default=0.0, help="colour jitter strength, 0 = off")
    tr.add_argument("--class-balance", type=float, default=0.5,
                    help="draw class c with probability ~ n_c**this (1 = as in the data, 0 = balanced)")
    tr.add_argument("--snapshots", type=int, nargs="*", default=[], help="steps at which to save EMA snapshots")
    tr.add_argument("--checkpoint-every", type=int, default=500)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    tr.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    tr.add_argument("--data", default=str(DATA_FILE))
    tr.set_defaults(func=_cmd_train)

    sa = sub.add_parser("sample", help="write a PNG grid (and optionally a GIF) of samples",
                        description="Sample sprites for chosen classes; one row per class.")
    sa.add_argument("--out", default="outputs/samples.png")
    sa.add_argument("--gif", default=None, help="also write the denoising animation here")
    sa.add_argument("--classes", nargs="+", default=CLASS_NAMES, help="class names or ids, one row block each")
    sa.add_argument("--per-class", type=int, default=8)
    sa.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    sa.add_argument("--steps", type=int, default=25, help="DDIM steps (1..500)")
    sa.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    sa.add_argument("--guide-w", type=float, default=2.0, help="classifier-free guidance weight")
    sa.add_argument("--model", default="sprites", help="name in weights/manifest.json")
    sa.add_argument("--weights", default=None, help="a weights or checkpoint file instead of --model")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--device", default=None)
    sa.set_defaults(func=_cmd_sample)

    ex = sub.add_parser("export", help="copy a finished run's EMA weights and snapshots beside a manifest",
                        description="Copy --run's EMA weights (fp32) and snapshots (fp16) into --weights-dir, with "
                                    "sha256, config, hardware and training time in its manifest.json. Only "
                                    "--to-weights touches the shipped weights/.")
    ex.add_argument("--run", default="runs/sprites")
    ex.add_argument("--name", default="sprites")
    ex.add_argument("--command", default=None, help="the training command to record")
    ex.add_argument("--weights-dir", default="outputs/export",
                    help="where to write the files and their manifest (default outputs/export)")
    ex.add_argument("--to-weights", action="store_true",
                    help="write into the course's weights/ instead, replacing what ships")
    ex.add_argument("--train-minutes", type=float, default=None, help="wall-clock training time to record "
                    "(default: as measured in the checkpoint)")
    ex.set_defaults(func=_cmd_export)

    tc = sub.add_parser("train-classifier", help="train the SpriteClassifier the metrics use",
                        description="Train the small sprite classifier on a stratified 85%% split.")
    tc.add_argument("--out", default="runs/classifier.pt")
    tc.add_argument("--to-weights", action="store_true",
                    help="replace the shipped weights/classifier.pt and its manifest entry")
    tc.add_argument("--epochs", type=int, default=30)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--data", default=str(DATA_FILE))
    tc.set_defaults(func=_cmd_train_classifier)

    ev = sub.add_parser("evaluate", help="write the quality tables (sprite-FID, KID, accuracy, memorisation)",
                        description="Measure a sprite model: sprite-FID and KID against the real-vs-real floor, "
                                    "a sampler table, class accuracy under guidance, and memorisation. Writes "
                                    "metrics.json, metrics.md and memorisation.png to --out.")
    ev.add_argument("--out", default="outputs/evaluation", help="folder for the tables (default outputs/evaluation)")
    ev.add_argument("--to-weights", action="store_true",
                    help="write the tables into weights/ and the headline numbers into its manifest")
    ev.add_argument("--n", type=int, default=1000, help="samples per FID/KID (and real sprites per side)")
    ev.add_argument("--per-class", type=int, default=100, help="samples per class for guided accuracy")
    ev.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 25, 50, 100])
    ev.add_argument("--guide-ws", type=float, nargs="+", default=[0, 1, 2, 4])
    ev.add_argument("--model", default="sprites")
    ev.add_argument("--snapshots", nargs="*", default=[], help="more manifest names to score with DDIM-25 only")
    ev.add_argument("--weights", default=None, help="a weights or checkpoint file instead of --model")
    ev.add_argument("--fast", action="store_true", help="bf16 autocast for the network where the CPU has it")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--device", default=None)
    ev.add_argument("--data", default=str(DATA_FILE))
    ev.set_defaults(func=_cmd_evaluate)

    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.func(args)


if __name__ == "__main__":
    main()
