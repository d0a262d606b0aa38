"""diffusion_utilities.py: the course's code, in the order the notebooks teach it.

    Data        the sprites, contexts, devices    load_sprites, to_tensor_images, one_hot, get_device
    Notebook 1  Noise schedule, forward process   make_schedule, perturb_input, predict_x0
    Notebook 2  Model                             ContextUnet (eps-, v- or, notebook 8, u-prediction)
    Notebook 3  Training                          diffusion_loss (v target, Min-SNR), train_step, EMA,
                                                  sprite_batches, train (the loop)
    Notebook 4  DDPM sampling                     posterior, denoise_add_noise, sample_ddpm
    Notebook 5  Context and guidance              predict_noise (classifier-free guidance), rescale_guidance
    Notebook 6  DDIM                              ddim_sigma, denoise_ddim, ddim_timesteps, sample_ddim
    Notebook 7  Beyond sampling                   invert_ddim, slerp, inpaint, sample_dpm_solver
    Notebook 8  Flow matching                     convert_prediction, flow_time, flow_loss, euler_step,
                                                  predict_velocity, sample_flow (DDIM = Euler), straightness
    Notebook 9  Distillation                      distillation_target, distillation_times, distill_loss
                                                  (a student does in one call what its teacher does in two)
    Appendix    pictures, weights                 show_images, plot_sample, load_model, load_pretrained,
                                                  model_schedule (the schedule a model was trained with)
    Appendix    input checks                      what a wrong argument is told (shapes, ranges, types)

Conventions. Images are float tensors of shape (B, 3, H, W) in [-1, 1]. Timesteps are integers
0..T, where x_0 is a clean image and x_T is (almost) pure noise; the network is given t / T.
A context is a (B, n_cfeat) float tensor: one-hot for a class, a blend of rows for a mix, all zeros
for "no context". Nothing here reads notebook globals: every function takes what it needs.

The names follow DeepLearning.AI's "How Diffusion Models Work" (perturb_input, denoise_add_noise,
denoise_ddim, ContextUnet, sample_ddpm, sample_ddim), with that course's bugs fixed: the forward
process has its square root, the residual shortcut is a trained layer, DDIM works for any step count.
This file is only the lesson: the machinery around it (the trainer with checkpoints, resume and torchrun,
bf16, metrics, the manifest's writer, the command line) lives in course_tools/, which imports this
module and never the reverse. `python diffusion_utilities.py train|sample|export|evaluate|distill --help` works.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
DATA_FILE = ROOT / "data" / "sprites16.npz"
WEIGHTS_DIR = ROOT / "weights"


# ---------------------------------------------------------------------------------------------
# Data: the sprites (shown from notebook 1 on) and their labels as context vectors
# ---------------------------------------------------------------------------------------------

def find_data_file(path):
    """path, or, when a relative path does not exist from here, the same path beside this module."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (ROOT / path).exists():
        path = ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"sprite file not found: {path}. It ships with the course as data/sprites16.npz; clone "
                                "the whole repository, or rebuild it with `bash data/download_crawl.sh && python "
                                "data/build_sprites.py`.")
    return path


def load_sprites(path="data/sprites16.npz"):
    """The sprite dataset: (images, labels, class_names).

    images: uint8 (N, 16, 16, 3) RGB on white; labels: int64 (N,) in 0..4;
    class_names: list of 5 str (hero, non-hero, food, spell, item).
    """
    path = find_data_file(path)
    try:
        with np.load(path) as d:
            missing = sorted({"images", "labels", "class_names"} - set(d.files))
            if missing:
                raise ValueError(f"{path} is not a sprite dataset: it lacks {missing} (has {sorted(d.files)})")
            images, labels, class_names = d["images"], d["labels"], [str(s) for s in d["class_names"]]
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # empty, truncated or not an npz file
        raise ValueError(f"{path} cannot be read as a dataset (.npz): {err}. Rebuild it, or restore it with "
                         "`git checkout -- data/`") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{path}: images must be uint8 pixels of shape (N, H, H, 3), got {images.dtype} "
                         f"{images.shape} (float images in [0, 1] would train on black: multiply by 255 first)")
    if len(images) < 2 or labels.shape != (len(images),):
        raise ValueError(f"{path}: need at least 2 images and one label each; got {len(images)} images, labels "
                         f"{labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"{path}: labels must be integers in 0..{len(class_names) - 1} (one per class name)")
    return images, labels.astype(np.int64), class_names


def to_tensor_images(images):
    """uint8 (N, H, W, 3) in 0..255 -> float (N, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def augment_batch(x, *, generator=None):
    """Random left-right flips: float images (B, C, H, W) -> the same, about half of them mirrored.

    A mirrored sprite is as good a sprite, so flips double the data. generator: a seeded CPU
    torch.Generator (it may drive a batch on a GPU: the coin flips are drawn on its device).
    """
    where = generator.device if generator is not None else x.device
    mirror = (torch.rand(x.shape[0], generator=generator, device=where) < 0.5).to(x.device)
    return torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)


def one_hot(labels, n_cfeat=5):
    """Integer class ids (B,) -> float one-hot contexts (B, n_cfeat)."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of integer class ids, got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_cfeat):
        raise ValueError(f"class ids must lie in 0..{n_cfeat - 1}, got {int(labels.min())}..{int(labels.max())}")
    return F.one_hot(labels.long(), n_cfeat).float()


def get_device(device=None):
    """torch.device(device) when given; otherwise the best available: cuda, then Apple's mps, then cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Notebook 1. Noise schedule
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


def make_schedule(timesteps=500, beta1=1e-4, beta2=0.02, kind="linear", *, terminal_signal=None):
    """A DDPM noise schedule with T = `timesteps` steps.

    kind="linear" (the course's): beta_t grows linearly from beta1 at t=0 to beta2 at t=T.
    kind="cosine" (Nichol & Dhariwal 2021): alpha-bar follows a squared cosine; beta1 and beta2
    are ignored. It destroys the image more gradually, which helps small images.
    terminal_signal: rescale sqrt(ab_t) linearly so that sqrt(ab_0) stays 1 and sqrt(ab_T) becomes
    this (the linear schedule leaves 0.079 of the image in x_T, which sampling from pure noise
    ignores; Lin et al. 2024). Needs a model trained on the same schedule (research/terminal_snr.py).
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
    if terminal_signal is not None:
        s, s_T = ab_t.sqrt(), float(ab_t[-1].sqrt())
        if not (isinstance(terminal_signal, (int, float)) and 0 < terminal_signal < s_T):
            raise ValueError(f"terminal_signal must lie in (0, {s_T:.3f}), the schedule's own sqrt(ab_T); "
                             f"got {terminal_signal!r}")
        ab_t = (terminal_signal + (s - s_T) * (1 - terminal_signal) / (1 - s_T)) ** 2
        a_t = torch.cat([a_t[:1], ab_t[1:] / ab_t[:-1]])
        b_t = torch.cat([b_t[:1], 1 - a_t[1:]])
    return Schedule(b_t.float(), a_t.float(), ab_t.float())


# ---------------------------------------------------------------------------------------------
# Notebook 1. Forward process: noising in closed form
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
    ab = _per_image(schedule.ab_t, t, x)
    return ab.sqrt() * x + (1 - ab).sqrt() * noise


def predict_x0(x_t, t, pred_noise, schedule):
    """The clean image implied by a noise prediction: invert perturb_input for x. Same shapes."""
    _check_images(x_t, "x_t")
    t = _timestep_tensor(t, x_t.shape[0], schedule)
    ab = _per_image(schedule.ab_t, t, x_t)
    return (x_t - (1 - ab).sqrt() * pred_noise) / ab.sqrt()


# ---------------------------------------------------------------------------------------------
# Notebook 2. Model: the course's ContextUnet, with its random-shortcut bug fixed (and any height a multiple of 4)
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
    the samplers convert it back to eps, see predict_noise), or a flow model's velocity u = eps - x0 when
    prediction="u" (notebook 8; it is given s in [0, 1] where the others get t / T). Time and context enter the decoder at
    two resolutions: the context embedding multiplies the features, the time embedding is added.
    norm: "batch" (the course's BatchNorm) or "group" (see make_norm).
    model.settings holds these arguments (saved beside the weights, so a file rebuilds its network).
    model.autocast_dtype: None (compute in fp32), or e.g. torch.bfloat16 to run forward under autocast
    (faster on hardware with native bf16; the output is returned as x's dtype).
    About 1.48 M parameters at n_feat=64, 0.37 M at n_feat=32.
    """

    def __init__(self, in_channels=3, n_feat=64, n_cfeat=5, height=16, *, norm="batch", prediction="eps"):
        super().__init__()
        if height % 4 != 0 or height < 4:
            raise ValueError(f"height must be a positive multiple of 4 (the U-Net halves it twice), got {height}")
        if prediction not in ("eps", "v", "u"):
            raise ValueError(f"prediction must be 'eps' (noise), 'v' (velocity) or 'u' (flow velocity), got {prediction!r}")
        self.in_channels, self.n_feat, self.n_cfeat, self.height = in_channels, n_feat, n_cfeat, height
        self.prediction, self.autocast_dtype = prediction, None
        self.settings = {"in_channels": in_channels, "n_feat": n_feat, "n_cfeat": n_cfeat, "height": height,
                         "norm": norm, "prediction": prediction}

        self.init_conv = ResidualConvBlock(in_channels, n_feat, is_res=True, norm=norm)
        self.down1 = UnetDown(n_feat, n_feat, norm)
        self.down2 = UnetDown(n_feat, 2 * n_feat, norm)
        self.to_vec = nn.Sequential(nn.AvgPool2d(height // 4), nn.GELU())  # the course's AvgPool2d(4) broke h >= 32

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

    def forward(self, x, t, c=None):
        t, c = self._checked_inputs(x, t, c)                    # t as (B, 1), c as (B, n_cfeat)
        with self._precision(x):
            x0 = self.init_conv(x)                              # encoder: (B, F, h, h)
            d1 = self.down1(x0)                                 # (B, F, h/2, h/2)
            d2 = self.down2(d1)                                 # (B, 2F, h/4, h/4)
            hidden = self.to_vec(d2)                            # (B, 2F, 1, 1)

            cemb1, temb1 = self.contextembed1(c), self.timeembed1(t)
            cemb2, temb2 = self.contextembed2(c), self.timeembed2(t)

            u1 = self.up0(hidden)                               # decoder: context multiplies, time adds
            u2 = self.up1(cemb1 * u1 + temb1, d2)
            u3 = self.up2(cemb2 * u2 + temb2, d1)
            return self.out(torch.cat((u3, x0), 1)).to(x.dtype)

    def _precision(self, x):
        """Autocast to self.autocast_dtype when set; otherwise nothing (a caller's own autocast still applies)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast_dtype)

    def _checked_inputs(self, x, t, c):
        B, expected = (x.shape[0] if torch.is_tensor(x) else 0), (self.in_channels, self.height, self.height)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x must hold floats in [-1, 1], got {x.dtype}; convert pixels with du.to_tensor_images")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.numel() not in (1, B):
            raise ValueError(f"t must hold 1 or B={B} values of t/T, got shape {tuple(t.shape)}")
        if c is None:
            c = torch.zeros(B, self.n_cfeat, dtype=x.dtype, device=x.device)
        elif not torch.is_tensor(c) or c.shape != (B, self.n_cfeat):
            got = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            raise ValueError(f"c must be a (B, n_cfeat) = ({B}, {self.n_cfeat}) context tensor or None, got {got}")
        return t.reshape(-1, 1).expand(B, 1), c.to(x.dtype)


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Notebook 3. Training
# ---------------------------------------------------------------------------------------------

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
    ab = _per_image(schedule.ab_t, t, x0)
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def diffusion_loss(model, x, c, schedule, *, drop_prob=0.1, snr_gamma=None, t_probs=None, generator=None):
    """The DDPM training objective on one batch: MSE between the true and the predicted target.

    x: clean images (B, C, H, W) in [-1, 1]; c: contexts (B, n_cfeat) or None. A random t in 1..T
    per image; each context is replaced by the zero vector with probability drop_prob, so the same
    network also learns unconditional generation (needed for classifier-free guidance).
    The target is the noise, or v = velocity(...) for a model with prediction="v".
    snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023): each image's loss is weighted by
      min(SNR_t, gamma) / SNR_t (eps) or min(SNR_t, gamma) / (SNR_t + 1) (v), which stops the
      low-noise steps from dominating the gradient. None = unweighted.
    t_probs: probabilities of t = 1..T, shape (T,); None = uniform (DDPM's).
    generator: a seeded torch.Generator for t, the noise and the dropped contexts (a CPU generator may
      drive a batch on a GPU: the numbers are drawn on its device).
    """
    _check_images(x)
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
    B, device = x.shape[0], x.device
    draw_on = generator.device if generator is not None else device
    if t_probs is None:
        t = torch.randint(1, schedule.T + 1, (B,), device=draw_on, generator=generator).to(device)
    else:
        t = (torch.multinomial(t_probs.to(draw_on), B, replacement=True, generator=generator) + 1).to(device)
    noise = torch.randn(x.shape, device=draw_on, generator=generator, dtype=x.dtype).to(device)
    x_t = perturb_input(x, t, noise, schedule)
    if c is not None:
        keep = (torch.rand(B, device=draw_on, generator=generator) >= drop_prob).to(device, c.dtype)
        c = c * keep[:, None]
    pred = model(x_t, t.to(x.dtype) / schedule.T, c)
    network = getattr(model, "module", model)  # data-parallel training wraps the network: it is in .module
    v_pred = getattr(network, "prediction", "eps") == "v"
    target = velocity(x, noise, t, schedule) if v_pred else noise
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    s = snr(schedule).to(device)[t]
    weight = s.clamp(max=snr_gamma) / (s + 1 if v_pred else s)
    per_image = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    return (weight * per_image).mean()


def train_step(model, optimizer, x, c, schedule, *, loss_fn=None, **loss_options):
    """One optimiser step on one batch; returns the loss as a float. loss_fn: diffusion_loss when None, or
    flow_loss (notebook 8); loss_options go to it (drop_prob, snr_gamma, t_probs, generator, ...)."""
    model.train()
    loss = (loss_fn or diffusion_loss)(model, x, c, schedule, **loss_options)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


class EMA:
    """An exponential moving average of a model's weights, used for sampling.

    The decay ramps up as min(decay, (1 + n) / (warmup + n)) so early averages are not dominated by
    the random initialisation (a larger warmup averages over fewer steps early on). With warmup 10 the
    ramp stays below 0.999 for 8,990 updates, so in shorter runs it, not decay, sets the length of the
    average: about the last ninth of the steps. BatchNorm buffers are copied, not averaged.
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


def class_sampling_weights(labels, power=0.5):
    """Per-sprite sampling weights so class c is drawn with probability proportional to n_c**power.

    power=1 keeps the data's proportions, power=0 balances classes fully (and makes the model
    memorise the 48 food sprites); 0.5 is a modest boost for rare classes.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    w = counts[labels].astype(np.float64) ** (power - 1.0)
    return w / w.sum()


def sprite_batches(images, labels, *, batch_size, n_cfeat=5, class_balance=0.5, flip=True, generator=None,
                   device="cpu"):
    """Endless training batches (x, c): x (batch_size, 3, H, W) in [-1, 1], c one-hot (batch_size, n_cfeat).

    images: uint8 (N, H, W, 3) and labels (N,), as load_sprites returns them. Sprites are drawn with
    replacement, class k with probability proportional to n_k ** class_balance (class_sampling_weights),
    and mirrored at random (augment_batch). generator: a seeded CPU torch.Generator.
    """
    x_all = to_tensor_images(images)  # converted once; a batch only indexes
    labels = np.asarray(labels)
    c_all = one_hot(torch.as_tensor(labels), n_cfeat)
    weights = torch.from_numpy(class_sampling_weights(labels, class_balance))
    while True:
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        x = augment_batch(x_all[idx], generator=generator) if flip else x_all[idx]
        yield x.to(device), c_all[idx].to(device)


def train(model, batches, schedule, *, steps, lr=1e-3, lr_min=5e-5, warmup=200, ema=None, optimizer=None,
          start=0, callback=None, progress=True, **loss_options):
    """Notebook 3's training loop: for every step a batch, one optimiser step, the moving average.

    model: a ContextUnet on its device; batches: an iterator of (x, c), e.g. sprite_batches(...);
    steps: the run's length. The learning rate warms up over `warmup` steps, then decays (lr_at).
    ema: an EMA of model (made here when None); optimizer: Adam at lr when None.
    loss_options go to train_step: loss_fn (flow_loss trains a flow model, notebook 8) and the loss's options.
    callback(step, loss) runs after every step (a live plot, a checkpoint); returning False stops the run.
    start: the step to begin at (a resumed run goes on with its learning-rate schedule).
    Returns (ema, losses): the moving average (its .model is what we sample) and every step's loss.
    """
    from tqdm.auto import tqdm

    optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    ema = ema if ema is not None else EMA(model)
    losses = []
    with tqdm(range(start, steps), disable=not progress, desc="training", mininterval=2) as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, lr_min, warmup)
            x, c = next(batches)                                                  # 1. a batch of sprites
            loss = train_step(model, optimizer, x, c, schedule, **loss_options)  # 2. one step down the loss
            ema.update(model)                                                    # 3. the moving average
            losses.append(loss)
            if (step + 1) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
            if callback is not None and callback(step + 1, loss) is False:
                break
    return ema, losses


# ---------------------------------------------------------------------------------------------
# Notebooks 4-6. Samplers: DDPM (4), context and guidance (5), DDIM (6)
# ---------------------------------------------------------------------------------------------

def posterior(x0, x_t, t, schedule):
    """q(x_{t-1} | x_t, x_0), the forward process run backwards when x_0 is known (Ho et al. 2020, eq. 6-7):
    (mean, variance) for an integer step t in 1..T; mean has x_t's shape, variance (beta-tilde) is 0-dim.
    DDPM's reverse step is this mean with the network's guess of x_0 put in (notebook 4)."""
    a, b, ab, ab_prev = schedule.a_t[t], schedule.b_t[t], schedule.ab_t[t], schedule.ab_t[t - 1]
    mean = ab_prev.sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    return mean, (1 - ab_prev) / (1 - ab) * b


def denoise_add_noise(x, t, pred_noise, schedule, *, z=None):
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
    elif z.shape != x.shape:
        raise ValueError(f"z must have the shape of x, {tuple(x.shape)} (one fresh noise per sample), got {tuple(z.shape)}")
    b, a, ab = (_per_image(v, t, x) for v in (schedule.b_t, schedule.a_t, schedule.ab_t))
    mean = (x - pred_noise * (1 - a) / (1 - ab).sqrt()) / a.sqrt()
    return mean + b.sqrt() * z


def ddim_sigma(t, t_prev, eta, schedule):
    """DDIM's noise level for a jump t -> t_prev (Song et al. 2020, eq. 16):
    eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev). t, t_prev: ints (a 0-dim result) or
    LongTensors (B,). With eta = 1 and t_prev = t - 1, sigma^2 is the posterior's beta-tilde."""
    ab_t = schedule.ab_t
    ab, ab_prev = ab_t[torch.as_tensor(t).to(ab_t.device)], ab_t[torch.as_tensor(t_prev).to(ab_t.device)]
    return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()


def denoise_ddim(x, t, t_prev, pred_noise, schedule, *, eta=0.0, z=None):
    """One DDIM step, x_t -> x_{t_prev} with t_prev < t (Song et al. 2020, eq. 12; sigma from eq. 16).

    x0 = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)
    x_{t_prev} = sqrt(ab_prev) * x0 + sqrt(1 - ab_prev - sigma^2) * eps + sigma * z,
    sigma = ddim_sigma(t, t_prev, eta, schedule).
    eta=0 is deterministic; eta=1 matches DDPM's posterior variance. t in 1..T, t_prev in 0..t-1.
    """
    _check_images(x)
    if pred_noise.shape != x.shape:
        raise ValueError(f"pred_noise must have the shape of x, {tuple(x.shape)}, got {tuple(pred_noise.shape)}")
    _check_eta(eta)
    B = x.shape[0]
    t = _timestep_tensor(t, B, schedule, "t", low=1)
    t_prev = _timestep_tensor(t_prev, B, schedule, "t_prev", low=0)
    if bool((t_prev >= t).any()):
        raise ValueError("t_prev must be smaller than t (DDIM steps go from noise towards the image)")
    ab_prev = _per_image(schedule.ab_t, t_prev, x)
    x0 = predict_x0(x, t, pred_noise, schedule)
    sigma = ddim_sigma(t, t_prev, eta, schedule).to(x.device, x.dtype).view(-1, 1, 1, 1)
    direction = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * pred_noise
    out = ab_prev.sqrt() * x0 + direction
    if eta > 0:
        if z is None:
            z = torch.randn_like(x)
        elif z.shape != x.shape:
            raise ValueError(f"z must have the shape of x, {tuple(x.shape)}, got {tuple(z.shape)}")
        out = out + sigma * z
    return out


def rescale_guidance(guided, cond, phi):
    """Guidance rescale (Lin et al. 2024, sec. 3.4): guided * std(cond) / std(guided), blended with guided.

    guided, cond: the network's guided and conditional outputs (B, C, H, W); std is over each sample's
    values. Extrapolating with w inflates the guided output's spread, and the image comes out
    over-saturated; scaling it back to the conditional output's spread undoes that. phi in [0, 1]
    blends: 0 is plain guidance, 1 full rescale (the paper suggests 0.7; our grid, 0.85).
    """
    rescaled = guided * (cond.std(dim=(1, 2, 3), keepdim=True) / guided.std(dim=(1, 2, 3), keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def predict_noise(model, x, t, schedule, context=None, guide_w=0.0, *, guide_interval=None, guide_rescale=0.0):
    """The network's noise estimate at integer step t in 0..T, with classifier-free guidance.

    eps = (1 + w) * eps(x, c) - w * eps(x, zero context); w = 0 is the plain conditional estimate.
    Both passes run as one batch. t may also be a LongTensor (B,), one step per image (notebook 9's teacher;
    no guide_interval then). A v-predicting model's output is turned into eps first:
    eps = sqrt(ab_t) * v + sqrt(1 - ab_t) * x_t (substitute x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
    into v's definition). context: (B, n_cfeat) floats or None. The sampler's arithmetic is fp32
    (the network may compute in bf16: see ContextUnet.autocast_dtype).
    guide_interval=(low, high): guide only where low <= t <= high, elsewhere w = 0 (a "guidance
    interval", Kynkaanniemi et al. 2024: guidance at the noisiest steps narrows what gets drawn
    more than it helps the class show). guide_rescale=phi: see rescale_guidance; it acts on what the
    network predicts (v for a v-model, as in the paper), before the conversion to eps.
    """
    _check_images(x)
    if getattr(model, "prediction", "eps") == "u":
        raise ValueError("this is a flow-matching model (prediction='u'): it predicts a velocity, not noise; "
                         "sample it with du.sample_flow (notebook 8)")
    if torch.is_tensor(t):  # one step per image, as in training (notebook 9's teacher); guided everywhere
        if guide_interval is not None:
            raise ValueError("guide_interval needs one integer step t for the whole batch")
        t = _timestep_tensor(t, x.shape[0], schedule)
    elif not isinstance(t, (int, np.integer)) or not 0 <= t <= schedule.T:
        raise ValueError(f"t must be an integer step in 0..{schedule.T} (or a LongTensor of one per image), got {t!r}")
    low, high = _check_guide_interval(guide_interval, schedule.T) or (0, schedule.T)
    guide_rescale = _check_guide_rescale(guide_rescale)
    if not torch.is_tensor(t) and not low <= t <= high:
        guide_w = 0.0
    out = _guided(model, x, t / schedule.T, context, guide_w, guide_rescale)
    if getattr(model, "prediction", "eps") == "v":
        ab = _per_image(schedule.ab_t, torch.as_tensor(t).expand(x.shape[0]), x)
        out = ab.sqrt() * out + (1 - ab).sqrt() * x
    return out


@torch.no_grad()
def sample_ddpm(model, n_sample, schedule, *, context=None, guide_w=0.0, save_rate=20, generator=None,
                add_noise=True, progress=False, guide_interval=None, guide_rescale=0.0):
    """Generate n_sample images with the full DDPM reverse process (T network calls).

    Returns (samples, intermediates): samples (n_sample, 3, H, W) float in about [-1, 1];
    intermediates a numpy array (frames, n_sample, 3, H, W): x_T, then x_t for every t divisible
    by save_rate and the last few steps, ending with the final samples.
    context: None, class ids (n_sample,), or contexts (n_sample, n_cfeat); guide_w: guidance weight;
    guide_interval: (low, high) steps where guidance acts (None: every step), and guide_rescale (phi in
    [0, 1], see rescale_guidance), as in predict_noise.
    generator: a seeded torch.Generator (on the CPU) for reproducible samples.
    add_noise=False never re-injects noise: the course's "incorrect" sampler (see sample_ddpm_incorrect).
    progress shows a tqdm bar.
    """
    from tqdm.auto import tqdm

    if not isinstance(save_rate, int) or save_rate < 1:
        raise ValueError(f"save_rate must be a positive integer, got {save_rate!r}")
    _check_student(model, schedule.T, guide_w, "ddpm")
    schedule, context, x = _start_sampling(model, n_sample, schedule, context, guide_w, generator)
    frames = [x.cpu().numpy()]
    with _EvalMode(model):
        for t in tqdm(range(schedule.T, 0, -1), disable=not progress, desc="DDPM", mininterval=1):
            eps = predict_noise(model, x, t, schedule, context, guide_w,
                                guide_interval=guide_interval, guide_rescale=guide_rescale)
            z = _randn(x.shape, generator, x.device) if (add_noise and t > 1) else torch.zeros_like(x)
            x = denoise_add_noise(x, t, eps, schedule, z=z)
            if (t - 1) % save_rate == 0 or t - 1 < 8:
                frames.append(x.cpu().numpy())
    return x, np.stack(frames)


def sample_ddpm_incorrect(model, n_sample, schedule, *, context=None, save_rate=20, generator=None):
    """DDPM without the fresh noise at each step: the mean of every step, never a sample.

    The lesson: the network was trained on x_t that carry the right amount of noise; without it the
    images drift off that distribution and collapse to smooth, similar blobs. Same returns as sample_ddpm.
    """
    return sample_ddpm(model, n_sample, schedule, context=context, save_rate=save_rate, generator=generator,
                       add_noise=False)


def ddim_timesteps(T, n_steps):
    """The n_steps + 1 timesteps DDIM visits, from T down to 0, spaced as evenly as integers allow.

    Works for every n_steps in 1..T; e.g. T=500, n_steps=3 gives [500, 333, 167, 0].
    """
    _check_n_steps(n_steps, T)
    return [int(round(T - T * i / n_steps)) for i in range(n_steps + 1)]


@torch.no_grad()
def sample_ddim(model, n_sample, schedule, *, n_steps=25, eta=0.0, context=None, guide_w=0.0, generator=None,
                progress=False, x_T=None, guide_interval=None, guide_rescale=0.0):
    """Generate n_sample images with DDIM in n_steps network calls (any n_steps in 1..T).

    Returns (samples, intermediates) like sample_ddpm; intermediates has n_steps + 1 frames (x_T and
    the result of every step). eta=0 is deterministic given the starting noise; eta=1 adds DDPM-like
    noise. context, guide_w, guide_interval, guide_rescale, generator and progress as in
    sample_ddpm. x_T: start from this noise (n_sample, C, H, W) instead of drawing it, e.g. one made by
    invert_ddim (notebook 7).
    """
    from tqdm.auto import tqdm

    _check_eta(eta)
    _check_student(model, n_steps, guide_w, "ddim")
    steps = ddim_timesteps(schedule.T, n_steps)
    schedule, context, x = _start_sampling(model, n_sample, schedule, context, guide_w, generator, x_T)
    frames = [x.cpu().numpy()]
    with _EvalMode(model):
        for t, t_prev in tqdm(list(zip(steps[:-1], steps[1:])), disable=not progress, desc="DDIM"):
            eps = predict_noise(model, x, t, schedule, context, guide_w,
                                guide_interval=guide_interval, guide_rescale=guide_rescale)
            z = _randn(x.shape, generator, x.device) if eta > 0 else None
            x = denoise_ddim(x, t, t_prev, eps, schedule, eta=eta, z=z)
            frames.append(x.cpu().numpy())
    return x, np.stack(frames)


# ---------------------------------------------------------------------------------------------
# Notebook 7. Beyond sampling: inversion, interpolation, inpainting, a faster solver
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def invert_ddim(model, x0, schedule, *, n_steps=100, context=None, guide_w=0.0, progress=False):
    """The noise x_T that deterministic DDIM (eta 0, the same n_steps and context) maps back to x0.

    DDIM inversion (Song et al. 2020, sec. 4.3; Dhariwal & Nichol 2021, app. F): eta-0 DDIM is a
    discretised ODE, so it can run backwards, from t = 0 up to T, with the same update:
    x_t = sqrt(ab_t) * x0_hat + sqrt(1 - ab_t) * eps, x0_hat = (x_prev - sqrt(1 - ab_prev) * eps) / sqrt(ab_prev).
    The exact inverse needs eps at the unknown x_t; we use eps(x_prev, t), so the round trip
    is not exact, and its error shrinks as n_steps grows.
    x0: (B, C, H, W) in [-1, 1]. Returns x_T of the same shape, on the model's device.
    """
    from tqdm.auto import tqdm

    _check_images(x0, "x0")
    if x0.shape[1:] != (model.in_channels, model.height, model.height):
        raise ValueError(f"x0 must be images (B, {model.in_channels}, {model.height}, {model.height}) for this model, "
                         f"got {tuple(x0.shape)}")
    _check_student(model, n_steps, guide_w, "ddim")  # a student inverts only along its own jumps
    steps = ddim_timesteps(schedule.T, n_steps)[::-1]  # 0 ... T
    schedule, context, _ = _start_sampling(model, x0.shape[0], schedule, context, guide_w, None, x0)
    x = x0.detach().float().to(_model_device(model))
    with _EvalMode(model):
        for t_prev, t in tqdm(list(zip(steps[:-1], steps[1:])), disable=not progress, desc="DDIM inversion"):
            eps = predict_noise(model, x, t, schedule, context, guide_w)
            ab, ab_prev = schedule.ab_t[t], schedule.ab_t[t_prev]
            x0_hat = (x - (1 - ab_prev).sqrt() * eps) / ab_prev.sqrt()
            x = ab.sqrt() * x0_hat + (1 - ab).sqrt() * eps
    return x


def slerp(a, b, t):
    """Spherical interpolation from a (t = 0) to b (t = 1), per sample: (B, ...) tensors, t a float in [0, 1].

    slerp = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b, theta the angle between
    a and b (Shoemake 1985). Gaussian noise in many dimensions lives near a sphere of radius sqrt(D);
    a straight line between two noises cuts inside it (at t = 0.5 its norm drops by about 1/sqrt(2)),
    which the model has never seen; slerp keeps the norm for equal-norm inputs. Nearly parallel
    inputs fall back to a straight line. theta = 2 atan2(|u_a - u_b|, |u_a + u_b|) for the unit vectors
    u: accurate at every angle in float32 (arccos of the cosine loses half the digits near 0), so no
    float64 is needed on GPUs that lack it.
    """
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        raise ValueError(f"a and b must be tensors of the same shape, got {getattr(a, 'shape', type(a))} "
                         f"and {getattr(b, 'shape', type(b))}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
        raise ValueError(f"t must be a number in [0, 1] (0 gives a, 1 gives b), got {t!r}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    fa, fb = a.reshape(len(a), -1).to(dtype), b.reshape(len(b), -1).to(dtype)
    ua, ub = fa / fa.norm(dim=1, keepdim=True).clamp(min=1e-12), fb / fb.norm(dim=1, keepdim=True).clamp(min=1e-12)
    theta = 2 * torch.atan2((ua - ub).norm(dim=1, keepdim=True), (ua + ub).norm(dim=1, keepdim=True))
    sin = torch.sin(theta)
    near = sin.abs() < 1e-6
    wa = torch.where(near, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / sin.where(~near, 1))
    wb = torch.where(near, torch.full_like(theta, float(t)), torch.sin(t * theta) / sin.where(~near, 1))
    return (wa * fa + wb * fb).reshape(a.shape).to(a.dtype)


@torch.no_grad()
def inpaint(model, x_known, mask, schedule, *, n_steps=50, resample=5, context=None, guide_w=0.0, generator=None,
            progress=False):
    """Fill in the pixels where mask == 0 so that they fit the known ones (RePaint, Lugmayr et al. 2022).

    Each reverse step t -> t_prev makes the unknown part with an ancestral (eta 1) DDIM step and
    the known part by noising x_known to t_prev (perturb_input), then pastes them together. The two
    halves were made independently, so RePaint "resamples": it noises the pasted x_{t_prev} back to t
    (x_t = sqrt(ab_t / ab_prev) x_{t_prev} + sqrt(1 - ab_t / ab_prev) z, the forward process) and
    repeats the step, resample times in all, letting the model harmonise the seam.
    x_known: (B, C, H, W) in [-1, 1]; mask: (B or 1, 1 or C, H, W), 1 = known and kept, 0 = filled in.
    n_steps: reverse steps (1..T); resample >= 1 (1 = no resampling); n_steps * resample network calls.
    Returns (samples, intermediates) like sample_ddim; the samples equal x_known exactly where mask == 1.
    """
    from tqdm.auto import tqdm

    mask = _check_inpainting(x_known, mask, model)
    _check_student(model, n_steps, guide_w, "inpaint (RePaint)")
    if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1 (1 = plain RePaint without resampling), got {resample!r}")
    steps = ddim_timesteps(schedule.T, n_steps)
    schedule, context, x = _start_sampling(model, len(x_known), schedule, context, guide_w, generator)
    x_known, mask = x_known.float().to(x.device), mask.to(x.device)
    frames = [x.cpu().numpy()]
    with _EvalMode(model):
        for t, t_prev in tqdm(list(zip(steps[:-1], steps[1:])), disable=not progress, desc="RePaint"):
            for r in range(resample):
                eps = predict_noise(model, x, t, schedule, context, guide_w)
                unknown = denoise_ddim(x, t, t_prev, eps, schedule, eta=1.0, z=_randn(x.shape, generator, x.device))
                known = perturb_input(x_known, t_prev, _randn(x.shape, generator, x.device), schedule)
                x_prev = mask * known + (1 - mask) * unknown
                if r < resample - 1:  # back to t: the forward process from t_prev to t
                    a = schedule.ab_t[t] / schedule.ab_t[t_prev]
                    x = a.sqrt() * x_prev + (1 - a).sqrt() * _randn(x.shape, generator, x.device)
            x = x_prev
            frames.append(x.cpu().numpy())
    x = mask * x_known + (1 - mask) * x  # ab_0 = 1, so this changes nothing but float rounding
    return x, np.stack(frames)


def _lambda(schedule, t):
    """Half the log signal-to-noise ratio at step t: log(sqrt(ab_t) / sqrt(1 - ab_t)); +inf at t = 0.
    Computed in float64 on the CPU (Apple's GPUs have no float64); returns a CPU tensor."""
    ab = schedule.ab_t.detach().cpu().double()[t]
    return 0.5 * (torch.log(ab) - torch.log1p(-ab))


def logsnr_timesteps(schedule, n_steps):
    """n_steps + 1 integer timesteps from T down to 0, evenly spaced in lambda (log-SNR) from T to
    t = T // 50, then the last step to 0 (lambda is infinite at 0). Lu et al. 2022 step evenly in
    lambda: the ODE's solution changes at a similar pace per unit of lambda. Repeated integers are
    dropped, so very large n_steps may give fewer steps."""
    T = schedule.T
    _check_n_steps(n_steps, T)
    t_min = max(1, T // 50)
    lam = _lambda(schedule, torch.arange(1, T + 1))  # decreasing in t
    targets = torch.linspace(float(lam[T - 1]), float(lam[t_min - 1]), n_steps)  # [lambda_T .. lambda_t_min]
    steps = [int(torch.argmin((lam - v).abs())) + 1 for v in targets] + [0]
    return [t for i, t in enumerate(steps) if i == 0 or t != steps[i - 1]]


@torch.no_grad()
def sample_dpm_solver(model, n_sample, schedule, *, n_steps=10, context=None, guide_w=0.0, generator=None,
                      progress=False, x_T=None, guide_interval=None, guide_rescale=0.0):
    """Generate n_sample images with DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in n_steps network calls.

    Same ODE as eta-0 DDIM, solved with a second-order multistep method: each step reuses the
    previous step's clean-image estimate. With alpha = sqrt(ab), sigma = sqrt(1 - ab),
    lambda = log(alpha / sigma) and h = lambda_t - lambda_s for a step s -> t:
        D = (1 + 1 / (2r)) x0_s - 1 / (2r) x0_prev, r = h_prev / h   (D = x0_s on the first step)
        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D.
    With D = x0_s this is exactly a DDIM step. The last step (to t = 0, where lambda is infinite)
    is first order: it returns D = x0_s, as DDIM's last step does. Timesteps: logsnr_timesteps.
    Returns (samples, intermediates) like sample_ddim; options as in sample_ddim.
    """
    from tqdm.auto import tqdm

    _check_student(model, n_steps, guide_w, "dpm-solver")
    steps = logsnr_timesteps(schedule, n_steps)
    schedule, context, x = _start_sampling(model, n_sample, schedule, context, guide_w, generator, x_T)
    frames, x0_prev, h_prev = [x.cpu().numpy()], None, None
    with _EvalMode(model):
        for s, t in tqdm(list(zip(steps[:-1], steps[1:])), disable=not progress, desc="DPM-Solver++"):
            eps = predict_noise(model, x, s, schedule, context, guide_w,
                                guide_interval=guide_interval, guide_rescale=guide_rescale)
            x0 = predict_x0(x, s, eps, schedule)
            if t == 0:
                x = x0
            else:
                h = float(_lambda(schedule, t) - _lambda(schedule, s))
                D = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)
                sigma_ratio = ((1 - schedule.ab_t[t]) / (1 - schedule.ab_t[s])).sqrt()
                x = sigma_ratio * x - schedule.ab_t[t].sqrt() * math.expm1(-h) * D
                h_prev = h
            x0_prev = x0
            frames.append(x.cpu().numpy())
    return x, np.stack(frames)


# ---------------------------------------------------------------------------------------------
# Notebook 8. Flow matching: the same family of paths, and Euler's method on the straight one
# ---------------------------------------------------------------------------------------------

PREDICTIONS = ("eps", "x0", "v", "u")


def convert_prediction(pred, x_t, alpha, sigma, *, source, target):
    """Turn one kind of prediction into another at the state x_t = alpha x0 + sigma eps of any path.

    Kinds: "eps" (the noise), "x0" (the clean image), "v" = alpha eps - sigma x0 (Salimans & Ho 2022) and
    "u" = eps - x0, the velocity d x_s / d s along the straight path (x_s = (1 - s) x0 + s eps; Lipman et al.
    2023, Liu et al. 2023). pred, x_t: (B, C, H, W); alpha, sigma: floats or tensors that broadcast to them.
    Each row solves the two linear equations "x_t = alpha x0 + sigma eps" and "pred = its definition" for
    (x0, eps); the target is then built from them. Exact for every (alpha, sigma) where the row's
    divisor is not 0 (alpha for eps, sigma for x0).
    """
    for name, kind in (("source", source), ("target", target)):
        if kind not in PREDICTIONS:
            raise ValueError(f"{name} must be one of {PREDICTIONS}, got {kind!r}")
    if source == "eps":
        eps, x0 = pred, (x_t - sigma * pred) / alpha
    elif source == "x0":
        eps, x0 = (x_t - alpha * pred) / sigma, pred
    elif source == "v":
        norm = alpha ** 2 + sigma ** 2
        eps, x0 = (sigma * x_t + alpha * pred) / norm, (alpha * x_t - sigma * pred) / norm
    else:
        eps, x0 = (x_t + alpha * pred) / (alpha + sigma), (x_t - sigma * pred) / (alpha + sigma)
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "u": eps - x0}[target]


def flow_time(t, schedule):
    """Where DDPM's step t lies on the straight path: (s, scale) on the CPU, 0-dim for an int t, (B,) for a tensor.

    With alpha = sqrt(ab_t), sigma = sqrt(1 - ab_t): scale = alpha + sigma and s = sigma / scale. Dividing
    by the scale puts DDPM's state on the straight path: x_t / scale = (1 - s) x0 + s eps, exactly, since
    alpha / scale = 1 - s. s runs from 0 (t = 0) to just under 1 (the shipped model's x_T sits at 0.996).
    """
    t = torch.as_tensor(t).cpu()
    if t.is_floating_point() or bool(((t < 0) | (t > schedule.T)).any()):
        raise ValueError(f"t must be integer steps in 0..{schedule.T}, got {t.tolist()}")
    ab = schedule.ab_t.detach().cpu().double()[t]  # float64 on the CPU only (Apple's GPUs have none)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    return (sigma / (alpha + sigma)).float(), (alpha + sigma).float()


def flow_loss(model, x, c, schedule=None, *, drop_prob=0.1, time_sampling="logit-normal", generator=None):
    """Flow matching's training objective on one batch (rectified flow: Liu et al. 2023; Lipman et al. 2023).

    x_s = (1 - s) x0 + s eps for one s in (0, 1) per image, and the network, given s where a diffusion model
    gets t / T, learns the path's velocity u = d x_s / d s = eps - x0 (plain MSE). Contexts are dropped with
    probability drop_prob, as in diffusion_loss. time_sampling: "uniform", or "logit-normal" (s =
    sigmoid(N(0, 1)): more training in the middle of the path, where the velocity is hardest to guess; SD3's
    choice, Esser et al. 2024). schedule is unused (the straight path needs none): it is there so that
    train() can call either loss the same way. x: (B, C, H, W) in [-1, 1].
    """
    _check_images(x)
    if time_sampling not in ("uniform", "logit-normal"):
        raise ValueError(f"time_sampling must be 'uniform' or 'logit-normal', got {time_sampling!r}")
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
    B, device = x.shape[0], x.device
    draw_on = generator.device if generator is not None else device
    draw = torch.rand if time_sampling == "uniform" else torch.randn
    s = draw(B, device=draw_on, generator=generator)
    s = (s if time_sampling == "uniform" else torch.sigmoid(s)).to(device, x.dtype)
    eps = torch.randn(x.shape, device=draw_on, generator=generator, dtype=x.dtype).to(device)
    x_s = (1 - s.view(-1, 1, 1, 1)) * x + s.view(-1, 1, 1, 1) * eps
    if c is not None:
        c = c * (torch.rand(B, device=draw_on, generator=generator) >= drop_prob).to(device, c.dtype)[:, None]
    return F.mse_loss(model(x_s, s, c).float(), (eps - x).float())


def euler_step(z, s, s_next, u):
    """One step of Euler's method along the path, from s to s_next < s: z + (s_next - s) * u. z, u: (B, C, H, W)."""
    if u.shape != z.shape:
        raise ValueError(f"u must have the shape of z, {tuple(z.shape)}, got {tuple(u.shape)}")
    if not 0 <= s_next < s <= 1:
        raise ValueError(f"need 0 <= s_next < s <= 1 (sampling runs from noise at s = 1 to data at 0), got {s} -> {s_next}")
    return z + (s_next - s) * u


def predict_velocity(model, z, s, schedule=None, context=None, guide_w=0.0):
    """The velocity u = eps - x0 at the point z of the straight path, with classifier-free guidance.

    A flow model (prediction="u") gives it directly at s. A diffusion model needs the integer step t whose
    flow time is s (pass s as that int t and the schedule): it sees x_t = scale * z, and its noise estimate
    is converted with alpha = sqrt(ab_t) and sigma = sqrt(1 - ab_t). Guidance is linear in both cases.
    """
    if getattr(model, "prediction", "eps") == "u":
        return _guided(model, z, float(s), context, guide_w)
    if schedule is None:
        raise ValueError("a diffusion model (prediction 'eps' or 'v') needs its schedule, and s as its step t")
    scale = flow_time(s, schedule)[1].to(z.device)
    ab = schedule.ab_t[s].to(z.device)
    eps = predict_noise(model, scale * z, s, schedule, context, guide_w)
    return convert_prediction(eps, scale * z, ab.sqrt(), (1 - ab).sqrt(), source="eps", target="u")


@torch.no_grad()
def sample_flow(model, n_sample, schedule=None, *, n_steps=10, context=None, guide_w=0.0, generator=None,
                x_T=None, progress=False):
    """Generate n_sample images with Euler's method on the velocity, in n_steps network calls.

    A flow model (prediction="u") runs from noise at s = 1 to s = 0 on an even grid in s. A diffusion model
    with its schedule runs on DDIM's grid (ddim_timesteps) mapped to flow time (flow_time), from
    z = x_T / scale_T: step for step the same arithmetic as deterministic DDIM (notebook 8 shows it).
    Returns (samples, intermediates, s_grid): intermediates are the n_steps + 1 states z on the straight
    path, s_grid their n_steps + 1 flow times. Options as in sample_ddim.
    """
    from tqdm.auto import tqdm

    _check_student(model, n_steps, guide_w, "euler")
    flow = getattr(model, "prediction", "eps") == "u"
    if not flow and schedule is None:
        raise ValueError("a diffusion model (prediction 'eps' or 'v') is sampled on its schedule: pass it")
    _check_n_steps(n_steps, 10 ** 6 if flow else schedule.T)
    times = torch.linspace(1, 0, n_steps + 1).tolist() if flow else ddim_timesteps(schedule.T, n_steps)
    grid = times if flow else flow_time(torch.tensor(times), schedule)[0].tolist()
    schedule, context, x = _start_sampling(model, n_sample, schedule, context, guide_w, generator, x_T)
    z = x if flow else x / flow_time(schedule.T, schedule)[1].to(x.device)
    frames = [z.cpu().numpy()]
    with _EvalMode(model):
        for k in tqdm(range(n_steps), disable=not progress, desc="Euler"):
            u = predict_velocity(model, z, times[k], schedule, context, guide_w)
            z = euler_step(z, grid[k], grid[k + 1], u)
            frames.append(z.cpu().numpy())
    return z, np.stack(frames), np.array(grid)


def straightness(frames, s_grid):
    """How far a sampling trajectory bends: 0 for a straight line, larger when it curves (Liu et al. 2023).

    frames: (K + 1, B, C, H, W) states along the path, s_grid: their K + 1 flow times (sample_flow's). Each
    step's velocity (z_{k+1} - z_k) / (s_{k+1} - s_k) is compared with the chord's, (z_K - z_0) / (s_K - s_0):
    the mean over steps (weighted by their length in s) of |step - chord|^2, divided by |chord|^2. One value
    per sample, shape (B,).
    """
    z, s = torch.as_tensor(np.asarray(frames), dtype=torch.float64), torch.as_tensor(np.asarray(s_grid), dtype=torch.float64)
    if z.dim() != 5 or len(s) != len(z) or len(z) < 2:
        raise ValueError(f"need frames (K + 1, B, C, H, W) and K + 1 flow times, got {tuple(z.shape)} and {len(s)}")
    ds = torch.diff(s).view(-1, 1, 1, 1, 1)
    steps, chord = torch.diff(z, dim=0) / ds, (z[-1] - z[0]) / (s[-1] - s[0])
    bend = ((steps - chord) ** 2).sum(dim=(2, 3, 4)) * ds.view(-1, 1).abs() / (s[-1] - s[0]).abs()
    return (bend.sum(0) / (chord ** 2).sum(dim=(1, 2, 3))).numpy()


# ---------------------------------------------------------------------------------------------
# Notebook 9. Distillation: a student that does in one call what its teacher does in two
# ---------------------------------------------------------------------------------------------

def distillation_target(teacher, x_t, t, t_mid, t_next, schedule, *, context=None, guide_w=0.0):
    """Progressive distillation's target (Salimans & Ho 2022, Algorithm 2): the clean image x_tilde that makes
    ONE deterministic DDIM step t -> t_next land where the teacher's TWO steps t -> t_mid -> t_next land.

    A DDIM step with clean-image estimate x lands on z'' = alpha'' x + (sigma'' / sigma) (x_t - alpha x); solved for
    x with z'' the teacher's result: x_tilde = (z'' - (sigma''/sigma) x_t) / (alpha'' - (sigma''/sigma) alpha),
    alpha = sqrt(ab), sigma = sqrt(1 - ab) at t and t_next. The divisor is > 0 whenever t_next < t.
    x_t: the student's input (B, C, H, W), already noised to step t; t > t_mid > t_next: ints or LongTensors (B,).
    The teacher runs with guidance guide_w, so the student learns the guided result without a second pass.
    """
    t, t_mid, t_next = (_timestep_tensor(v, x_t.shape[0], schedule, name) for v, name in
                        ((t, "t"), (t_mid, "t_mid"), (t_next, "t_next")))
    if bool(((t_mid >= t) | (t_next >= t_mid)).any()):
        raise ValueError("need t > t_mid > t_next: the teacher's two steps run from noise towards the image")
    if getattr(teacher, "distilled", {}).get("guide_w") and guide_w:
        raise ValueError("this teacher is a student that already learned guided results: pass guide_w=0")
    context = _prepare_context(context, x_t.shape[0], teacher, guide_w)
    _check_images(x_t, "x_t")
    x_t = x_t.to(_model_device(teacher))  # a learner's CPU tensor meets a teacher on the GPU
    with torch.no_grad(), _EvalMode(teacher):
        z_mid = denoise_ddim(x_t, t, t_mid, predict_noise(teacher, x_t, t, schedule, context, guide_w), schedule)
        z_next = denoise_ddim(z_mid, t_mid, t_next, predict_noise(teacher, z_mid, t_mid, schedule, context, guide_w),
                              schedule)
    ab, ab_next = _per_image(schedule.ab_t, t, x_t), _per_image(schedule.ab_t, t_next, x_t)
    ratio = (1 - ab_next).sqrt() / (1 - ab).sqrt()
    return (z_next - ratio * x_t) / (ab_next.sqrt() - ratio * ab.sqrt())


def distillation_times(n_steps, T):
    """(t, t_mid, t_next), three LongTensors (n_steps,): the student's n_steps DDIM jumps t -> t_next, and the
    midpoint t_mid where its teacher stops between them. The teacher walks DDIM's grid of 2 * n_steps calls
    (ddim_timesteps); the student's grid is every second point of it. n_steps: a power of two up to T / 2
    (halving a grid again and again keeps its points only then)."""
    if not isinstance(n_steps, (int, np.integer)) or n_steps < 1 or n_steps & (n_steps - 1) or 2 * n_steps > T:
        raise ValueError(f"n_steps must be a power of two from 1 to {T // 2} (each round halves the calls), got {n_steps!r}")
    grid = torch.tensor(ddim_timesteps(T, 2 * n_steps))
    return grid[0:-1:2], grid[1::2], grid[2::2]


def distill_loss(student, x, c, schedule, *, teacher, n_steps, guide_w=0.0, drop_prob=0.1, generator=None):
    """One batch of progressive distillation, for du.train(..., loss_fn=distill_loss, teacher=..., n_steps=...).

    Each image gets one of the student's n_steps jumps at random (distillation_times), is noised to its start
    t ONCE (perturb_input), and the student, seeing that x_t, learns the teacher's two-step distillation_target.
    The loss compares v, not x: v-MSE weights the x error by SNR + 1, so the jumps from pure noise, where
    alpha is near 0, still count (Salimans & Ho 2022, sec. 4). Contexts are dropped with probability drop_prob
    (the teacher then runs unguided). student and teacher predict v; x: (B, C, H, W) in [-1, 1].
    """
    _check_images(x)
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
    if getattr(teacher, "prediction", "eps") != "v" or getattr(student, "prediction", "eps") != "v":
        raise ValueError("distillation needs v-predicting teacher and student (an eps model divides by alpha ~ 0 "
                         "at the first jump): distil the shipped 'sprites' model or a student of it")
    B, device = x.shape[0], x.device
    draw_on = generator.device if generator is not None else device
    times = distillation_times(n_steps, schedule.T)
    k = torch.randint(0, n_steps, (B,), device=draw_on, generator=generator).cpu()
    t, t_mid, t_next = (v[k] for v in times)
    eps = torch.randn(x.shape, device=draw_on, generator=generator, dtype=x.dtype).to(device)
    x_t = perturb_input(x, t, eps, schedule)
    if c is not None:
        c = c * (torch.rand(B, device=draw_on, generator=generator) >= drop_prob).to(device, c.dtype)[:, None]
    x_tilde = distillation_target(teacher, x_t, t, t_mid, t_next, schedule, context=c, guide_w=guide_w)
    ab = _per_image(schedule.ab_t, t, x_t)
    v_tilde = convert_prediction(x_tilde, x_t, ab.sqrt(), (1 - ab).sqrt(), source="x0", target="v")
    return F.mse_loss(student(x_t, t.to(device) / schedule.T, c).float(), v_tilde.float())


# ---------------------------------------------------------------------------------------------
# Appendix. Pictures
# ---------------------------------------------------------------------------------------------

def to_display(x):
    """Images in [-1, 1] -> numpy float (..., H, W, 3) in [0, 1], faithfully: (x + 1) / 2, clipped.

    (The course stretched each channel of each image to its own min..max, which distorts colours
    and divides by zero on a flat channel.) Accepts (B, 3, H, W) or (3, H, W), tensor or numpy.
    """
    x = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    return np.clip((np.moveaxis(x, -3, -1) + 1) / 2, 0, 1)


def image_grid(x, nrow=8, pad=1, pad_value=1.0):
    """A batch (B, 3, H, W) in [-1, 1] as one numpy image (rows, columns, 3) in [0, 1], nrow images per row
    with pad pixels of pad_value between them (torchvision's make_grid)."""
    from torchvision.utils import make_grid

    x = x.detach().float().cpu() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x, dtype=np.float32))
    if x.dim() != 4:
        raise ValueError(f"image_grid needs a batch (B, 3, H, W), got shape {tuple(x.shape)}")
    grid = make_grid(((x.float() + 1) / 2).clamp(0, 1), nrow=nrow, padding=pad, pad_value=pad_value)
    return grid.permute(1, 2, 0).numpy()


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


def plot_sample(intermediates, nrow=8, interval=200, scale=0.6, titles=None):
    """A matplotlib FuncAnimation of a denoising trajectory, one grid per frame.

    intermediates: (frames, B, 3, H, W) in [-1, 1], as returned by sample_ddpm / sample_ddim.
    titles: optional list of one caption per frame (e.g. the timestep). Show it in a notebook with
    animation_html(ani), or save it as a GIF with ani.save("denoising.gif", writer="pillow").
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


# ---------------------------------------------------------------------------------------------
# Appendix. Weights
# ---------------------------------------------------------------------------------------------

def read_weights(path):
    """(state_dict with floats as fp32, model_args dict or {}, extras) from a weights file or a training
    checkpoint, loaded safely (weights_only=True) onto the CPU (a model moves itself after loading, so a
    file saved on a GPU opens anywhere). extras: what the file records beside the weights,
    {"schedule": make_schedule's arguments, "class_names": [...]}, each only when present."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}. The course's weights ship in weights/ "
                                "of the repository; clone it whole, or train your own with "
                                "`python diffusion_utilities.py train`.")
    try:
        state, args = torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as err:  # not a torch file, truncated, or pickled code that weights_only refuses
        raise ValueError(f"{path} is not a weights file or training checkpoint ({type(err).__name__}; files are "
                         "loaded weights only, so anything but tensors, including pickled code, is refused)") from None
    extras = {k: state[k] for k in ("schedule", "class_names", "distilled") if isinstance(state, dict) and state.get(k)}
    if isinstance(state, dict) and "model" in state and "ema" in state:  # a training checkpoint
        cfg = state.get("config", {})
        args = state.get("model_args") or {k: cfg[k] for k in ("n_feat", "norm", "prediction") if k in cfg}
        state = state["ema"]["model"]
    elif isinstance(state, dict) and "state_dict" in state:  # ema.pt, a snapshot
        state, args = state["state_dict"], state.get("model_args", {})
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds no model weights (a state_dict of tensors)")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, args, extras


def load_model(path, device=None, **model_args):
    """A ContextUnet with weights from path, in eval mode on device (default: get_device()).

    The architecture is read from the file when it records one (ema.pt, snapshots, checkpoints);
    model_args (n_feat, n_cfeat, height, norm, prediction) override it, e.g. for a bare state_dict.
    The noise schedule it was trained with goes to model.schedule_args (see model_schedule), its class
    names, where the file records them, to model.class_names.
    """
    state, saved, extras = read_weights(path)
    args = {**saved, **model_args}
    model = ContextUnet(**args)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit ContextUnet({', '.join(f'{k}={v!r}' for k, v in args.items())})"
                         f": {str(err).splitlines()[0]}; pass the architecture it was trained with (e.g. n_feat=...)") from None
    model.schedule_args = dict(extras.get("schedule", {}))
    model.class_names = [str(n) for n in extras.get("class_names", [])]
    model.distilled = dict(extras.get("distilled", {}))  # a notebook-9 student: {"steps", "guide_w", "teacher"}
    return model.to(get_device(device)).eval()


def model_schedule(model):
    """The noise schedule a model was trained with: make_schedule(**model.schedule_args), which
    load_model and load_pretrained fill in; the course's 500-step linear schedule when none is recorded."""
    return make_schedule(**getattr(model, "schedule_args", {}))


def read_manifest(weights_dir=WEIGHTS_DIR):
    """weights/manifest.json as a dict: name -> entry (file, sha256, kind, how it was made, metrics)."""
    path = Path(weights_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no weights manifest at {path}; the shipped weights live in weights/ of the "
                                "repository (clone it whole)")
    try:
        weights = json.loads(path.read_text())["weights"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid manifest ({err}); restore it with `git checkout -- weights/`") from None
    root = Path(weights_dir).resolve()
    for name, entry in weights.items():
        if root not in (root / str(entry.get("file", ""))).resolve().parents:
            raise ValueError(f"{path}: entry {name!r} points outside {root} ({entry.get('file')!r}); refusing to load it")
    return weights


def checked_entry(name, weights_dir=WEIGHTS_DIR):
    """(path, manifest entry) of a shipped file, once the file is found to match its sha256."""
    manifest = read_manifest(weights_dir)
    if name not in manifest:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(sorted(manifest))}")
    entry = manifest[name]
    path = Path(weights_dir) / entry["file"]
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} is listed in the manifest but missing; "
                                "restore it with `git checkout -- weights/`")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(f"weights file {path} does not match its manifest (sha256 {digest[:12]}..., expected "
                         f"{entry['sha256'][:12]}...): it was changed or damaged. Restore it with "
                         "`git checkout -- weights/` or re-download the repository.")
    return path, entry


def load_pretrained(name="sprites", device=None, weights_dir=WEIGHTS_DIR):
    """A shipped ContextUnet, ready to use in eval mode: name is a key of weights/manifest.json.

    "sprites" is the main sprite model (EMA weights); "sprites_step000250" and similar are snapshots
    from early in its training. The file's sha256 is checked against the manifest first, and a
    mismatch is refused. (The judging classifier: course_tools.metrics.load_classifier.)
    """
    path, entry = checked_entry(name, weights_dir)
    if entry["kind"] != "ContextUnet":
        raise ValueError(f"{name!r} is a {entry['kind']}, not a ContextUnet; the judging classifier is loaded "
                         "with course_tools.metrics.load_classifier")
    model = load_model(path, device, **entry.get("args", {}))
    model.schedule_args = model.schedule_args or entry.get("schedule", {})
    model.class_names = model.class_names or list(entry.get("class_names", []))
    model.distilled = model.distilled or dict(entry.get("distilled", {}))
    return model


# ---------------------------------------------------------------------------------------------
# Appendix. Input checks (a learner's mistake gets a message saying what to pass) and small plumbing
# ---------------------------------------------------------------------------------------------

def _check_images(x, name="x"):
    """Images must be a finite float tensor (B, C, H, W); uint8 pixels are refused, not misread."""
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of images with shape (B, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must hold floats in [-1, 1], got {x.dtype}; convert 0..255 pixels with "
                         "du.to_tensor_images (or x.float() / 127.5 - 1)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf")


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


def _per_image(values, t, x):
    """values[t] shaped (B, 1, 1, 1) to broadcast over images like x."""
    return values.to(x.device)[t.to(x.device)].view(-1, 1, 1, 1).to(x.dtype)


def _check_eta(eta):
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")


def _model_device(model):
    return next(model.parameters()).device


def _prepare_context(context, n_sample, model, guide_w):
    """Contexts as a float (n_sample, n_cfeat) tensor on the model's device, or None.

    context: None; integer class ids (n_sample,); contexts (n_sample, n_cfeat) as floats (one-hot
    rows or blends); or one context (1, n_cfeat) shared by every sample.
    """
    n_cfeat = model.n_cfeat
    if not (isinstance(guide_w, (int, float)) and math.isfinite(guide_w) and guide_w >= 0):
        raise ValueError(f"guide_w must be a finite number >= 0 (0 = no guidance), got {guide_w!r}")
    if context is None:
        if guide_w > 0:
            raise ValueError("classifier-free guidance (guide_w > 0) needs a context to steer towards")
        return None
    context = torch.as_tensor(context)
    if not context.is_floating_point():
        context = one_hot(context.reshape(-1) if context.dim() == 0 else context, n_cfeat)
    elif context.dim() == 1:
        raise ValueError(f"a 1-D context must hold integer class ids, got {context.dtype}; for one blended "
                         f"context pass shape (1, {n_cfeat}), for several pass ({n_sample}, {n_cfeat})")
    if context.dim() == 2 and context.shape == (1, n_cfeat):
        context = context.expand(n_sample, n_cfeat)
    if context.shape != (n_sample, n_cfeat):
        raise ValueError(f"context must be class ids ({n_sample},) or contexts ({n_sample}, {n_cfeat}), "
                         f"got {tuple(context.shape)}")
    if not bool(torch.isfinite(context).all()):
        raise ValueError("context holds NaN or inf")
    return context.float().to(_model_device(model))


def _check_guide_interval(guide_interval, T):
    """None (guide at every step) or two integer steps (low, high), 0 <= low <= high <= T."""
    if guide_interval is None:
        return None
    ok = (isinstance(guide_interval, (tuple, list)) and len(guide_interval) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in guide_interval)
          and 0 <= guide_interval[0] <= guide_interval[1] <= T)
    if not ok:
        raise ValueError(f"guide_interval must be two integer steps (low, high) with 0 <= low <= high <= {T}; "
                         f"guidance then acts only where low <= t <= high (None: at every step), got {guide_interval!r}")
    return int(guide_interval[0]), int(guide_interval[1])


def _check_guide_rescale(phi):
    if isinstance(phi, bool) or not isinstance(phi, (int, float)) or not 0 <= phi <= 1:
        raise ValueError(f"guide_rescale must be a number in [0, 1] (0: plain guidance, 1: full rescale), got {phi!r}")
    return float(phi)


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


def _start_sampling(model, n_sample, schedule, context, guide_w, generator, x_T=None):
    """What every sampler does first: check its inputs, move the schedule and context to the model's
    device, and draw x_T (or check the one given). Any nn.Module with ContextUnet's call signature
    model(x, t/T, context) and its attributes in_channels, height and n_cfeat can be sampled
    (prediction="v" if it predicts v). Returns (schedule, context, x_T)."""
    missing = [a for a in ("in_channels", "height", "n_cfeat") if not hasattr(model, a)]
    if not isinstance(model, nn.Module) or missing:
        raise ValueError(f"model must be an nn.Module called as model(x, t / T, context) with the attributes "
                         f"in_channels, height and n_cfeat, like ContextUnet; {type(model).__name__} lacks {missing}")
    if not isinstance(n_sample, int) or n_sample < 1:
        raise ValueError(f"n_sample must be a positive integer, got {n_sample!r}")
    device = _model_device(model)
    context = _prepare_context(context, n_sample, model, guide_w)
    shape = (n_sample, model.in_channels, model.height, model.height)
    if x_T is None:
        x = _randn(shape, generator, device)
    else:
        _check_images(x_T, "x_T")
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape} (n_sample, channels, height, width), got {tuple(x_T.shape)}")
        x = x_T.detach().float().to(device)
    return (schedule.to(device) if schedule is not None else None), context, x


def _check_inpainting(x_known, mask, model):
    """x_known: (B, C, H, W) in [-1, 1] for this model; mask: 0/1 floats (B or 1, 1 or C, H, W)."""
    _check_images(x_known, "x_known")
    want = (model.in_channels, model.height, model.height)
    if tuple(x_known.shape[1:]) != want:
        raise ValueError(f"x_known must have shape (B, {', '.join(map(str, want))}) for this model, "
                         f"got {tuple(x_known.shape)}")
    if float(x_known.abs().max()) > 1 + 1e-4:
        raise ValueError(f"x_known must lie in [-1, 1] (got values up to {float(x_known.abs().max()):.3g}); "
                         "convert 0..255 pixels with du.to_tensor_images")
    if not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[0] not in (1, len(x_known)) \
            or mask.shape[1] not in (1, want[0]) or tuple(mask.shape[2:]) != want[1:]:
        raise ValueError(f"mask must have shape (B or 1, 1 or {want[0]}, {want[1]}, {want[2]}) to match x_known "
                         f"{tuple(x_known.shape)}, got {tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
    mask = mask.float()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (fill in) and 1 (known, kept)")
    return mask


def _guided(model, x, time, context, guide_w, guide_rescale=0.0):
    """The network's output at x (time: t / T, or a flow model's s) with classifier-free guidance:
    (1 + w) * out(x, c) - w * out(x, zero context), both passes in one batch, as fp32; optionally rescaled."""
    B = x.shape[0]
    tt = time.to(x.device, x.dtype) if torch.is_tensor(time) else torch.full((B,), time, device=x.device, dtype=x.dtype)
    if guide_w == 0:
        return model(x, tt, context).float()
    both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([context, torch.zeros_like(context)])).float()
    out = (1 + guide_w) * both[:B] - guide_w * both[B:]  # linear, so the same for eps, v or u
    return rescale_guidance(out, both[:B], guide_rescale) if guide_rescale > 0 else out


def _check_student(model, n_steps, guide_w, sampler):
    """A distilled student (load_model sets model.distilled) samples only with DDIM at the calls it learned."""
    learned = getattr(model, "distilled", None)
    if not learned:
        return
    if sampler != "ddim" or n_steps != learned["steps"]:
        raise ValueError(f"this student was distilled for {learned['steps']} DDIM call(s) and learned only those "
                         f"jumps; sample it with du.sample_ddim(model, n, schedule, n_steps={learned['steps']}) "
                         f"(got {sampler} with {n_steps} calls)")
    if guide_w and learned.get("guide_w"):
        raise ValueError(f"this student learned its teacher's guided result (w = {learned['guide_w']}); "
                         "sample it with guide_w=0 (guiding twice would overshoot)")


def _check_n_steps(n_steps, T):
    if not isinstance(n_steps, (int, np.integer)) or not 1 <= n_steps <= T:
        raise ValueError(f"n_steps must be an integer in 1..{T} (the number of network calls), got {n_steps!r}")


if __name__ == "__main__":
    # The command line lives in course_tools; this keeps `python diffusion_utilities.py <command>` working.
    from course_tools.cli import main

    main()
