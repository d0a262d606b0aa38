"""The trainer behind `python diffusion_utilities.py train`: the course module's training loop
(diffusion_utilities.train, which notebook 3 teaches) with what a long run needs around it.

TrainConfig (checked settings, saved in every checkpoint), the run lock, checkpoints and exact resume,
time budgets, torchrun data parallelism, the NaN guard, bf16 and channels_last where the hardware has
them natively, and the recipe study's extra options (log-normal t, input perturbation, zero-init).
plan_steps, which notebook 3 uses, times a few steps of its run to fit a wait.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import diffusion_utilities as du
from course_tools.hardware import use_fast_settings
from course_tools.manifest import sha256_file
from course_tools.runs import (
    RunLock,
    RunState,
    all_generator_states,
    all_mean,
    distributed,
    end_distributed,
    save_atomic,
    wait_for_all,
    weights_payload,
)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint.

    The defaults are the half-hour recipe chosen by the recipe study (research/README.md: v-prediction and
    Min-SNR-5 weighting each bought more than any other change at a fixed wall-clock budget).
    """
    steps: int = 3300
    objective: str = "diffusion"
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
    terminal_signal: float | None = None
    seed: int = 0
    flip: bool = True
    class_balance: float = 0.5
    snapshot_steps: list = field(default_factory=list)
    checkpoint_every: int = 500

    def __post_init__(self):
        """Refuse settings that would train nothing or silently train wrong, naming the option."""
        def bad(name, why):
            raise ValueError(f"--{name.replace('_', '-')} {why}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "checkpoint_every", "timesteps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        for name in ("lr", "lr_min", "drop_prob", "ema_decay", "input_perturbation", "class_balance"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be a finite number")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "must lie in [0, 1)")
        if not 0 <= self.drop_prob <= 1:
            bad("drop_prob", "must lie in [0, 1]")
        if not isinstance(self.n_feat, int) or self.n_feat < 8 or self.n_feat % 8:
            bad("n_feat", "must be a positive multiple of 8 (the network's GroupNorm uses 8 groups)")
        if self.snr_gamma is not None and not (math.isfinite(self.snr_gamma) and self.snr_gamma > 0):
            bad("snr_gamma", "must be a finite number > 0, or None for no weighting")
        if self.warmup < 0 or self.ema_warmup < 1:
            bad("warmup" if self.warmup < 0 else "ema_warmup", "is out of range")
        if self.objective not in ("diffusion", "flow"):
            bad("objective", "must be 'diffusion' or 'flow'")
        if self.objective == "flow":  # flow matching (notebook 8): a velocity network on the straight path
            if self.prediction != "u" or self.snr_gamma is not None or self.input_perturbation or self.zero_init:
                raise ValueError("--objective flow trains a velocity network (prediction 'u') with the plain flow "
                                 "loss: it takes no --snr-gamma, --input-perturbation or --zero-init")
            if self.t_sampling not in ("uniform", "logit-normal"):
                bad("t_sampling", "must be 'uniform' or 'logit-normal' for --objective flow")
        elif self.prediction not in ("eps", "v"):
            bad("prediction", "must be 'eps' or 'v' for a diffusion model ('u' is --objective flow's)")
        elif self.t_sampling not in ("uniform", "lognormal"):
            bad("t_sampling", "must be 'uniform' or 'lognormal'")
        try:
            du.make_schedule(self.timesteps, terminal_signal=self.terminal_signal)
        except ValueError as err:
            bad("terminal_signal", str(err).split(";")[0].replace("terminal_signal ", ""))

    def schedule_args(self):
        """make_schedule's arguments for this run; saved beside the weights, so samplers use the same.
        A flow model has no noise schedule: {} (and nothing is saved)."""
        if self.objective == "flow":
            return {}
        args = {"timesteps": self.timesteps}
        if self.terminal_signal is not None:
            args["terminal_signal"] = self.terminal_signal
        return args


# -- the recipe study's extra options ---------------------------------------------------------------

def timestep_probabilities(schedule, kind="uniform"):
    """How training draws t: probabilities over 1..T, shape (T,), on the CPU (diffusion_loss's t_probs).

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
    ab = schedule.ab_t.detach().cpu().double()  # float64 on the CPU only (Apple's GPUs have none)
    log_sigma = 0.5 * torch.log((1 - ab) / ab)  # -inf at t = 0
    density = torch.exp(-0.5 * ((log_sigma[1:] + 1.2) / 1.2) ** 2)
    width = torch.diff(log_sigma).clamp(min=0)
    width[0] = log_sigma[2] - log_sigma[1]  # the first step starts at sigma = 0 (log -inf)
    p = density * width
    return (p / p.sum()).float()


class PerturbedInputs(nn.Module):
    """Input perturbation (Ning et al. 2023) around a network being trained: it sees x_t made with
    noise + gamma * extra noise while the loss's target stays the noise, to mimic the errors the sampler
    will feed it. x_t + gamma * sqrt(1 - ab_t) * extra is exactly that x_t. Its parameters and buffers
    are the network's, so optimiser, EMA and checkpoints see the network itself."""

    def __init__(self, network, schedule, gamma, generator):
        super().__init__()
        self.network, self.gamma, self.generator = network, gamma, generator
        self.sigmas = (1 - schedule.ab_t).sqrt().cpu()  # a plain attribute, not a buffer: the state stays the network's
        self.prediction = getattr(network, "module", network).prediction

    def forward(self, x_t, t_frac, c):
        t = (t_frac * (len(self.sigmas) - 1)).round().long().cpu()
        sigma = self.sigmas[t].view(-1, 1, 1, 1).to(x_t.device, x_t.dtype)
        extra = torch.randn(x_t.shape, generator=self.generator, dtype=x_t.dtype).to(x_t.device)
        return self.network(x_t + self.gamma * sigma * extra, t_frac, c)


# -- the data a run trains on -----------------------------------------------------------------------

class TrainingData:
    """A sprite file for a run: its images, labels and class names, its path and sha256 (a resumed run
    checks it trains on the same data), and the run's batches (du.sprite_batches)."""

    def __init__(self, data_path):
        self.images, self.labels, self.class_names = du.load_sprites(data_path)
        self.path = du.find_data_file(data_path)
        self.n_classes, self.height = len(self.class_names), self.images.shape[1]
        self.digest = sha256_file(self.path)
        if len(self.images) < 1000:  # warnings.warn shows this once per run
            warnings.warn(f"{self.path} holds only {len(self.images)} images ({self.n_classes} classes, {self.height}x"
                          f"{self.height}); a ContextUnet has over a million weights (0.37 M at n_feat 32, 1.48 M at 64) "
                          "and can memorise so few: expect samples that copy training images. Our sprite set has "
                          "2,718; add images, or use a smaller --n-feat and fewer --steps.", stacklevel=3)

    def batches(self, config, batch_size, generator, device, memory_format):
        batches = du.sprite_batches(self.images, self.labels, batch_size=batch_size, n_cfeat=self.n_classes,
                                    class_balance=config.class_balance, flip=config.flip, generator=generator,
                                    device=device)
        return ((x.contiguous(memory_format=memory_format), c) for x, c in batches)


# -- a run ------------------------------------------------------------------------------------------

def run_training(config, out_dir, *, data_path=du.DATA_FILE, resume=False, minutes=None, device=None,
                 progress=True, callback=None, stop_at=None):
    """Train a ContextUnet on the sprites with config's recipe. Returns the list of per-step losses.

    Writes to out_dir: checkpoint.pt (model, EMA, optimiser, step, generator states), history.json
    (loss per step), ema.pt (final EMA weights) and snap_<step>.pt snapshots.
    With resume=True an interrupted run continues from checkpoint.pt and ends in the same state
    as an uninterrupted one (config.steps may differ from the checkpoint's: the run then ends at
    the new length, with the learning-rate schedule re-planned from the current step). minutes (a
    time budget) or stop_at (a step) stops early, after saving a checkpoint, so a run can be split
    over sessions. callback(step, loss) is called after each step.
    A LOCK file (course_tools.runs.RunLock) keeps a second training out of out_dir while this one runs.
    Under torchrun it trains data-parallel: see course_tools.runs.distributed.
    """
    lock = RunLock(out_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock:
        try:
            return _run(config, Path(out_dir), data_path, resume, minutes, device, progress, callback, stop_at)
        finally:
            end_distributed()  # a torchrun job's processes leave their group together


def _run(config, out_dir, data_path, resume, minutes, device, progress, callback, stop_at):
    rank, world, device = distributed(du.get_device(device))
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly over {world} processes")
    data = TrainingData(data_path)
    torch.manual_seed(config.seed)
    schedule = du.make_schedule(**config.schedule_args()).to(device)
    network = du.ContextUnet(n_feat=config.n_feat, n_cfeat=data.n_classes, height=data.height, norm=config.norm,
                             prediction=config.prediction).to(device)
    if config.zero_init:  # the untrained network predicts 0: the loss starts at exactly E[target^2]
        nn.init.zeros_(network.out[-1].weight)
        nn.init.zeros_(network.out[-1].bias)
    memory_format = use_fast_settings(network, device)
    stepped = network  # what train_step calls: the network, or a wrapper around it
    if world > 1:
        if device.type == "cuda":
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        stepped = nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)
    gen = torch.Generator().manual_seed(config.seed + rank)  # drives this process's batches, t, noise, dropout
    if config.input_perturbation > 0:
        stepped = PerturbedInputs(stepped, schedule, config.input_perturbation, gen)
    ema = du.EMA(network, config.ema_decay, config.ema_warmup)
    opt = torch.optim.Adam(network.parameters(), lr=config.lr)
    run = RunState(out_dir, config, data, device, rank, world)
    if resume:
        run.resume(network, ema, opt, gen)
    deadline = time.time() + 60 * minutes if minutes is not None else None

    def after_step(step, loss):
        loss = all_mean(loss, world)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step}; training stopped. The last good "
                                     f"checkpoint ({run.saved_step}) is kept in {run.ckpt_path}; try a lower --lr")
        run.step = step
        run.history.append(loss)
        if callback is not None:
            callback(step, loss)
        if step in config.snapshot_steps and rank == 0:
            run.save_snapshot(ema.model)
        late = deadline is not None and all_mean(time.time() > deadline, world) > 0  # all processes agree
        stop = step < config.steps and (late or step == stop_at)
        if step % config.checkpoint_every == 0 or step == config.steps or stop:
            run.save_checkpoint(network, ema, opt, all_generator_states(gen, world))
        return not stop

    if config.objective == "flow":
        loss_options = {"loss_fn": du.flow_loss, "time_sampling": config.t_sampling}
    else:
        t_probs = None if config.t_sampling == "uniform" else timestep_probabilities(schedule, config.t_sampling)
        loss_options = {"snr_gamma": config.snr_gamma, "t_probs": t_probs}
    du.train(stepped, data.batches(config, config.batch_size // world, gen, device, memory_format), schedule,
             steps=config.steps, lr=config.lr, lr_min=config.lr_min, warmup=config.warmup, ema=ema, optimizer=opt,
             start=run.step, callback=after_step, progress=progress and rank == 0, drop_prob=config.drop_prob,
             generator=gen, **loss_options)
    if run.step >= config.steps and rank == 0:
        save_atomic({**weights_payload(ema.model), "class_names": data.class_names, "schedule": config.schedule_args()},
                    out_dir / "ema.pt")
    wait_for_all(world)  # under torchrun, every process leaves once rank 0's files are written
    return run.history


def plan_steps(seconds, *, model, batches, schedule, max_steps, min_steps=1, probe_steps=10, **train_options):
    """How many steps of a du.train run fit in a wait of `seconds` here: (steps, seconds per step).

    Times probe_steps steps of the same run on a copy of model (the first 3 warm up and are left out;
    the copy's batches come from `batches`, and a generator in train_options draws for them too, so both
    move on, reproducibly) and returns the steps that fit,
    between min_steps and max_steps. Notebook 3 plans its run with it, so a learner on a slower CPU
    waits about as long as one on a fast one, for fewer steps.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"seconds must be a positive number (the wait you accept), got {seconds!r}")
    if probe_steps < 5:
        raise ValueError(f"probe_steps must be at least 5 (3 warm up, 2 are timed), got {probe_steps}")
    stamps = []
    probe = copy.deepcopy(model)
    du.train(probe, batches, schedule, steps=probe_steps, progress=False,
             callback=lambda step, loss: stamps.append(time.perf_counter()), **train_options)
    per_step = float(np.median(np.diff(stamps[2:])))
    return max(1, min_steps, min(max_steps, int(seconds / per_step))), per_step


__all__ = ["TrainConfig", "TrainingData", "PerturbedInputs", "plan_steps", "run_training", "timestep_probabilities"]
