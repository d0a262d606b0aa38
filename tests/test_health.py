"""Notebook 3's "is my run healthy?" (course_tools.health): the loss per noise level, the verdicts, and broken
runs that it must name (a learning rate far too high, sprites left in 0..255 or 0..1)."""
import numpy as np
import pytest
import torch

import diffusion_utilities as du
from course_tools import health

REFERENCE = health.load_reference()
BAND = REFERENCE["band"]


def test_buckets_cover_every_step_once():
    cut = health.buckets(500)
    assert cut == [(1, 100), (101, 200), (201, 300), (301, 400), (401, 500)]
    assert health.buckets(7, 3) == [(1, 2), (3, 4), (5, 7)]
    with pytest.raises(ValueError, match="n_buckets"):
        health.buckets(10, 0)


def test_the_reference_is_what_its_runs_recorded():
    runs = np.array([r["losses"] for r in REFERENCE["runs"]])
    assert len(runs) >= 4 and {r["steps"] for r in REFERENCE["runs"]} == {150, 420}
    margin = REFERENCE["margin"]
    assert np.allclose(BAND["high"], runs.max(0) * (1 + margin)) and np.allclose(BAND["low"], runs.min(0) * (1 - margin))
    assert [tuple(b) for b in BAND["buckets"]] == health.buckets(500)
    assert all(r.startswith("python -m research.health_reference") for r in REFERENCE["commands"])


def test_loss_by_noise_level_is_the_training_loss_restricted_to_each_band():
    torch.manual_seed(0)
    model = du.ContextUnet(n_feat=16, prediction="v")
    schedule = du.make_schedule(500)
    images, labels, _ = du.load_sprites()
    losses = health.loss_by_noise_level(model, schedule, n_images=32)
    again = health.loss_by_noise_level(model, schedule, n_images=32)
    assert losses.shape == (5,) and np.array_equal(losses, again), "the same model must score the same"
    # An independent restatement for the noisiest band: t uniform in 401..500, the v target, Min-SNR-5.
    pick = np.linspace(0, len(images) - 1, 32).astype(int)
    x, c = du.to_tensor_images(images[pick]), du.one_hot(torch.as_tensor(labels[pick]))
    g = torch.Generator().manual_seed(0)
    t = torch.multinomial(torch.cat([torch.zeros(400), torch.full((100,), 0.01)]), 32, replacement=True, generator=g) + 1
    noise = torch.randn(x.shape, generator=g)
    model.eval()
    with torch.no_grad():
        ab = schedule.ab_t[t].view(-1, 1, 1, 1)
        pred = model(ab.sqrt() * x + (1 - ab).sqrt() * noise, t / 500, c)
        snr = ab.flatten() / (1 - ab.flatten())
        per_image = ((pred - (ab.sqrt() * noise - (1 - ab).sqrt() * x)) ** 2).mean(dim=(1, 2, 3))
        expected = float((snr.clamp(max=5) / (snr + 1) * per_image).mean())
    assert losses[-1] == pytest.approx(expected, rel=1e-4)


def test_the_models_mode_is_left_as_it_was():
    model = du.ContextUnet(n_feat=16, prediction="v").train()
    health.loss_by_noise_level(model, du.make_schedule(500), n_images=8)
    assert model.training


# -- the verdicts, on the numbers the course's runs recorded ---------------------------------------------

def history(start, end, steps=150):
    return np.linspace(start, end, steps)


def test_the_recorded_healthy_runs_are_healthy():
    for run in REFERENCE["runs"]:
        status, message = health.diagnose(history(run["start"], run["end"]), run["losses"], BAND)
        assert status == "healthy", message


@pytest.mark.parametrize("name, status, words", [
    ("lr 0.5", "lr", "learning rate"),
    ("data in [0, 1]", "data", "[-1, 1]"),
    ("data in [0, 255]", "data", "0..255"),
])
def test_the_recorded_broken_runs_are_named(name, status, words):
    run = REFERENCE["broken"][name]
    got, message = health.diagnose(history(run["first"], run["end"]), run["losses"], BAND)
    assert got == status and words in message, message


def test_a_short_healthy_run_is_short_not_broken():
    losses = np.array(BAND["high"]) * 1.3
    status, message = health.diagnose(history(0.23, losses.mean()), losses, BAND)
    assert status == "short" and "more steps" in message


def test_nan_and_the_batch_range_are_named_first():
    h = history(0.23, 0.07)
    h[40] = np.nan
    assert health.diagnose(h, BAND["low"], BAND)[0] == "nan"
    assert health.diagnose(history(0.23, 0.07), BAND["low"], BAND, data_range=(0.0, 1.0))[0] == "data"
    assert health.diagnose(history(0.23, 0.07), BAND["low"], BAND, data_range=(-1.0, 1.0))[0] == "healthy"


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="every step"):
        health.diagnose([0.2] * 5, BAND["low"], BAND)
    with pytest.raises(ValueError, match="one value per band"):
        health.diagnose(history(0.2, 0.1), [0.1, 0.1], BAND)
    with pytest.raises(ValueError, match="T = 500"):
        health.check_run_health(du.ContextUnet(n_feat=16), du.make_schedule(100), history=history(0.2, 0.1))
    with pytest.raises(ValueError, match="labels"):
        health.loss_by_noise_level(du.ContextUnet(n_feat=16), du.make_schedule(500),
                                   images=du.load_sprites()[0][:4], labels=None)


# -- deliberately broken runs, trained here ----------------------------------------------------------------

def short_run(*, lr=2e-3, scale=None, steps=40):
    """Notebook 3's recipe for a few steps, optionally broken; returns (ema model, schedule, history, a batch)."""
    images, labels, _ = du.load_sprites()
    schedule = du.make_schedule(500)
    torch.manual_seed(0)
    model = du.ContextUnet(n_feat=32, prediction="v")
    gen = torch.Generator().manual_seed(0)
    batches = du.sprite_batches(images, labels, batch_size=64, class_balance=0.0, generator=gen)
    if scale is not None:
        from research.health_reference import rescaled
        batches = rescaled(batches, scale)
    ema, losses = du.train(model, batches, schedule, steps=steps, warmup=8, lr=lr, snr_gamma=5.0, generator=gen,
                           progress=False)
    return ema.model, schedule, losses, next(batches)


@pytest.mark.slow  # trains three short runs (about 20 s)
@pytest.mark.parametrize("broken, status, words", [
    (dict(lr=2.0), "lr", "learning rate"),
    (dict(scale="0..255"), "data", "0..255"),
    (dict(scale="0..1"), "data", "[-1, 1]"),
])
def test_a_deliberately_broken_run_is_named(broken, status, words, capsys):
    model, schedule, losses, batch = short_run(**broken)
    got, _ = health.check_run_health(model, schedule, history=losses, reference=REFERENCE)
    message = capsys.readouterr().out
    assert got in (status, "nan" if status == "lr" else status) and words in message, message
    with_batch, _ = health.check_run_health(model, schedule, history=losses, batch=batch, reference=REFERENCE)
    assert with_batch == ("data" if "scale" in broken else got)
