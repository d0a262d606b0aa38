"""Is my training run healthy? Notebook 3's check of a learner's run against the course's own runs.

loss_by_noise_level(model, schedule) measures the training objective (du.diffusion_loss, the loss the run
minimised) on fixed real sprites, separately for a handful of noise levels (bands of t). A healthy run of
notebook 3's recipe lands inside a band recorded from the course's own runs of that recipe
(research/health_reference.json, made by `python -m research.health_reference`). check_run_health says
"healthy", or names what looks wrong: a loss that became NaN or never fell (the learning rate), sprites
outside [-1, 1] (the data), or a run that is merely short.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

import diffusion_utilities as du

REFERENCE = du.ROOT / "research" / "health_reference.json"
N_BUCKETS = 5


def buckets(T, n_buckets=N_BUCKETS):
    """[(first t, last t), ...]: 1..T cut into n_buckets bands of equal width (the last takes any rest)."""
    if not 1 <= n_buckets <= T:
        raise ValueError(f"n_buckets must lie in 1..T={T}, got {n_buckets}")
    width = T // n_buckets
    return [(1 + k * width, T if k == n_buckets - 1 else (k + 1) * width) for k in range(n_buckets)]


@torch.no_grad()
def loss_by_noise_level(model, schedule, *, images=None, labels=None, n_images=256, n_buckets=N_BUCKETS,
                        snr_gamma=5.0, seed=0):
    """The training loss of `model` per band of t: a numpy array (n_buckets,), noisiest band last.

    It is du.diffusion_loss (the v or eps target, Min-SNR-gamma weighted, as notebook 3 trains) on the
    same n_images real sprites with their own classes (none dropped), the same noise and the same t for
    every model, so two runs compare like for like. images/labels: uint8 sprites as du.load_sprites gives
    them (default: the course's sprites, n_images of them spread over the set).
    """
    if images is None:
        images, labels, _ = du.load_sprites()
    if labels is None or len(labels) != len(images):
        raise ValueError("pass the labels that go with images (du.load_sprites returns both)")
    device = next(model.parameters()).device
    pick = np.linspace(0, len(images) - 1, min(n_images, len(images))).astype(int)
    x = du.to_tensor_images(images[pick]).to(device)
    c = du.one_hot(torch.as_tensor(np.asarray(labels)[pick]), model.n_cfeat).to(device)
    was_training = model.training
    model.eval()
    losses = []
    try:
        for lo, hi in buckets(schedule.T, n_buckets):
            t_probs = torch.zeros(schedule.T)
            t_probs[lo - 1:hi] = 1.0 / (hi - lo + 1)            # t uniform inside the band
            generator = torch.Generator().manual_seed(seed)      # the same t and noise for every model
            loss = du.diffusion_loss(model, x, c, schedule, drop_prob=0.0, snr_gamma=snr_gamma,
                                     t_probs=t_probs, generator=generator)
            losses.append(float(loss))
    finally:
        model.train(was_training)
    return np.array(losses)


def load_reference(path=REFERENCE):
    """What research/health_reference.py recorded: 'band' (the healthy runs' 'buckets', 'low', 'high' per bucket
    and 'start_high', the highest loss of their first 10 steps), 'runs' and 'broken' (the broken runs)."""
    return json.loads(path.read_text())


def diagnose(history, losses, band, *, data_range=None):
    """The verdict on a run, as (status, message): status 'healthy', 'nan', 'data', 'lr' or 'short'.

    history: the loss of every training step (history[0] comes before the first update, so it depends only on
    the data and the fresh network); losses: loss_by_noise_level of the trained model on the course's sprites;
    band: load_reference()["band"]; data_range: (min, max) of one training batch, when known.
    The signatures, as measured in research/health_reference.json: a learning rate far too high leaves the
    loss where an untrained network starts (or makes it NaN); sprites left in 0..255 start thousands of times
    too high; sprites in 0..1 train to a low loss on themselves but score far worse on sprites in [-1, 1].
    """
    history = np.asarray(history, dtype=float)
    losses = np.asarray(losses, dtype=float)
    if len(history) < 20:
        raise ValueError(f"history must hold the loss of every step (at least 20), got {len(history)}")
    if len(losses) != len(band["high"]):
        raise ValueError(f"losses must hold one value per band of t ({len(band['high'])}), got {len(losses)}")
    bad = np.flatnonzero(~np.isfinite(history))
    if len(bad) or not np.all(np.isfinite(losses)):
        first = int(bad[0]) + 1 if len(bad) else len(history)
        return "nan", (f"the loss became NaN or infinite (step {first}): the steps were too big for the network. "
                       "Lower the learning rate (notebook 3 uses lr=2e-3).")
    if data_range is not None:
        lo, hi = data_range
        if lo < -1.001 or hi > 1.001 or (lo >= 0 and hi > 0.5):
            return "data", (f"the training sprites span [{lo:.2f}, {hi:.2f}], not [-1, 1]: the network learned "
                            "another range than the samplers assume. Convert pixels with du.to_tensor_images "
                            "(x / 127.5 - 1).")
    first, end = history[0], history[-10:].mean()
    if first > 5 * band["start_high"]:
        return "data", (f"the very first loss, before any training, is {first:.3g}, far above the "
                        f"{band['start_high']:.2f} a fresh network gives on sprites in [-1, 1]: the data are "
                        "probably pixels in 0..255. Convert them with du.to_tensor_images.")
    if losses.mean() > 1.5 * end:
        return "data", (f"the network's loss on its own training batches ({end:.3f}) is far below its loss on the "
                        f"course's sprites in [-1, 1] ({losses.mean():.3f}): it learned another kind of image. "
                        "Are the training sprites in [-1, 1] (du.to_tensor_images), not 0..1?")
    above = [k for k, (got, high) in enumerate(zip(losses, band["high"])) if got > high]
    if not above:
        return "healthy", "healthy: the loss at every noise level lies within or below the course's runs."
    where = ", ".join(f"t {band['buckets'][k][0]}-{band['buckets'][k][1]}" for k in above)
    if end > band["start_low"]:
        return "lr", (f"the loss never fell below where an untrained network starts ({end:.3f} at the end, against "
                      f"{band['start_low']:.2f}), and sits above the course's runs at {where}: the learning rate is "
                      "probably far too high (notebook 3 uses 2e-3), or far too low.")
    return "short", (f"the loss fell (to {end:.3f}) but is still above the course's runs at {where}: a run that is "
                     "too short, not a broken one. Train more steps.")


def check_run_health(model, schedule, *, history, batch=None, reference=None):
    """Notebook 3's check: print and return the verdict on a run (see diagnose).

    model: the trained network (the EMA copy you sample from); history: every step's loss (du.train's
    second result, or the live plot's list); batch: one (x, c) from the run's batches, to check its range.
    """
    band = (reference if reference is not None else load_reference())["band"]
    if [tuple(b) for b in band["buckets"]] != buckets(schedule.T, len(band["buckets"])):
        raise ValueError(f"the reference was recorded for T = {band['buckets'][-1][1]}, this schedule has "
                         f"T = {schedule.T}")
    losses = loss_by_noise_level(model, schedule, n_buckets=len(band["buckets"]))
    data_range = None
    if batch is not None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        data_range = (float(x.min()), float(x.max()))
    status, message = diagnose(history, losses, band, data_range=data_range)
    print(message)
    return status, losses


def nan_safe(values):
    """Floats for JSON: NaN and infinities become None."""
    return [None if not math.isfinite(v) else v for v in map(float, values)]
