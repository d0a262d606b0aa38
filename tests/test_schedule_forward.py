"""The noise schedule and the closed-form forward process, against independent formulas."""
import numpy as np
import pytest
import torch

import diffusion_utilities as du


def test_linear_schedule_matches_formula(schedule):
    T = 500
    i = np.arange(T + 1)
    b = 1e-4 + (0.02 - 1e-4) * i / T
    a = 1 - b
    ab = np.concatenate([[1.0], np.cumprod(a[1:])])
    assert schedule.T == T
    for got, want in ((schedule.b_t, b), (schedule.a_t, a), (schedule.ab_t, ab)):
        assert got.shape == (T + 1,)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    assert schedule.ab_t[0] == 1.0


def test_schedule_known_values(schedule):
    # Values of the course's table (its ab_t also multiplies in a_0 = 1 - 1e-4: within 1e-4 relative).
    for t, ab in [(1, 0.99976), (100, 0.80947), (250, 0.27856), (500, 0.00629)]:
        assert schedule.ab_t[t].item() == pytest.approx(ab, rel=2e-4)


def test_cosine_schedule():
    s = du.make_schedule(1000, kind="cosine")
    assert s.ab_t[0] == 1 and torch.all(s.ab_t[1:] < s.ab_t[:-1])
    assert torch.all((s.b_t[1:] > 0) & (s.b_t[1:] <= 0.999))
    # halfway, the cosine schedule keeps far more signal than the linear one
    assert s.ab_t[500] > du.make_schedule(1000).ab_t[500] * 5


@pytest.mark.parametrize("kwargs", [dict(timesteps=0), dict(timesteps=10.5), dict(beta1=0.1, beta2=0.01),
                                    dict(beta2=1.5), dict(kind="quadratic")])
def test_schedule_bad_input(kwargs):
    with pytest.raises(ValueError):
        du.make_schedule(**kwargs)


def test_perturb_has_square_root(schedule):
    x = torch.zeros(1, 3, 4, 4)
    noise = torch.ones(1, 3, 4, 4)
    for t in (1, 100, 400):
        got = du.perturb_input(x, t, noise, schedule)
        want = np.sqrt(1 - schedule.ab_t[t].item())  # the course had 1 - ab_t here
        assert torch.allclose(got, torch.full_like(got, want), atol=1e-6)


def test_perturb_statistics(schedule):
    # x_t | x_0 ~ N(sqrt(ab) x_0, (1 - ab) I): check mean and variance on many draws.
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), 0.7)
    for t in (10, 183, 499):
        xt = du.perturb_input(x0, t, torch.randn(x0.shape, generator=g), schedule)
        ab = schedule.ab_t[t].item()
        assert xt.mean().item() == pytest.approx(np.sqrt(ab) * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.03, abs=1e-4)


def test_perturb_keeps_unit_variance(schedule):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(20000, 1, 2, 2, generator=g)
    for t in (50, 183, 300):  # the course's version fell to 0.75 near t = 183
        xt = du.perturb_input(x0, t, torch.randn(x0.shape, generator=g), schedule)
        assert xt.var().item() == pytest.approx(1.0, abs=0.03)


def test_perturb_per_sample_t(schedule):
    x = torch.randn(3, 3, 4, 4)
    noise = torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 250, 500])
    out = du.perturb_input(x, t, noise, schedule)
    for i in range(3):
        assert torch.allclose(out[i:i + 1], du.perturb_input(x[i:i + 1], int(t[i]), noise[i:i + 1], schedule))
    assert torch.equal(out[0], x[0])  # t = 0 is the clean image


def test_predict_x0_inverts_perturb(schedule):
    x = torch.randn(2, 3, 8, 8)
    noise = torch.randn(2, 3, 8, 8)
    xt = du.perturb_input(x, 321, noise, schedule)
    assert torch.allclose(du.predict_x0(xt, 321, noise, schedule), x, atol=1e-4)


@pytest.mark.parametrize("t,match", [(501, "0..500"), (-1, "0..500"), (torch.tensor([1, 2]), "shape"),
                                     (torch.tensor([0.5, 0.5, 0.5]), "integer"), ("7", "int")])
def test_perturb_bad_t(schedule, t, match):
    x = torch.zeros(3, 3, 4, 4)
    with pytest.raises(ValueError, match=match):
        du.perturb_input(x, t, torch.zeros_like(x), schedule)


def test_perturb_bad_shapes(schedule):
    with pytest.raises(ValueError, match="B, C, H, W"):
        du.perturb_input(torch.zeros(3, 4, 4), 1, torch.zeros(3, 4, 4), schedule)
    with pytest.raises(ValueError, match="same shape"):
        du.perturb_input(torch.zeros(1, 3, 4, 4), 1, torch.zeros(1, 3, 4, 5), schedule)


def test_terminal_signal_rescales_the_schedule():
    # Lin et al. 2024: sqrt(ab_t) mapped linearly so that sqrt(ab_0) = 1 and sqrt(ab_T) = the given value
    base, new = du.make_schedule(500), du.make_schedule(500, terminal_signal=0.004)
    s = base.ab_t.double().sqrt()
    want = 0.004 + (s - s[-1]) * (1 - 0.004) / (1 - s[-1])
    assert torch.allclose(new.ab_t.double().sqrt(), want, atol=1e-6)
    assert float(new.ab_t[0]) == 1.0 and float(new.ab_t[-1].sqrt()) == pytest.approx(0.004, rel=1e-5)
    assert bool((new.ab_t[1:] < new.ab_t[:-1]).all())
    # the steps still multiply up to the new alpha-bar, as the DDPM sampler assumes
    assert torch.allclose(torch.cumprod(new.a_t[1:].double(), 0), new.ab_t[1:].double(), rtol=1e-4)
    assert torch.allclose(new.b_t[1:], 1 - new.a_t[1:], atol=1e-6)
    for bad in (0.0, -0.1, 0.08, 1.0):
        with pytest.raises(ValueError, match="terminal_signal must lie in"):
            du.make_schedule(500, terminal_signal=bad)
