"""Notebook 7: DDIM inversion, slerp, RePaint inpainting and DPM-Solver++(2M), against closed-form ODE
solutions (GaussianOracle), the exact-noise oracle and independent formulas."""
import math

import pytest
import torch
from oracles import GaussianOracle, OracleUnet

import diffusion_utilities as du


@pytest.fixture
def gaussian(schedule):
    return GaussianOracle(mu=0.3, s=0.5, schedule=schedule)


def gaussian_images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 0.5 * torch.randn(n, 3, 4, 4, generator=g)).clamp(-1, 1)


def test_sample_ddim_from_given_noise_equals_drawn_noise(schedule, tiny_model):
    a, _ = du.sample_ddim(tiny_model, 3, schedule, n_steps=5, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    b, frames = du.sample_ddim(tiny_model, 3, schedule, n_steps=5, x_T=noise)
    assert torch.allclose(a, b) and torch.equal(torch.as_tensor(frames[0]), noise)


def test_inversion_matches_the_exact_ode_and_improves_with_steps(schedule, gaussian):
    x0 = gaussian_images()
    exact = gaussian.ode_map(x0, 0, schedule.T)
    errors, round_trips = [], []
    for n in (10, 25, 100):
        x_T = du.invert_ddim(gaussian, x0, schedule, n_steps=n)
        back, _ = du.sample_ddim(gaussian, len(x0), schedule, n_steps=n, x_T=x_T)
        errors.append(float((x_T - exact).abs().max()))
        round_trips.append(float((back - x0).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors
    assert round_trips[0] > round_trips[1] > round_trips[2] and round_trips[2] < 0.05, round_trips


def test_inversion_and_given_noise_refuse_bad_input(schedule, tiny_model):
    with pytest.raises(ValueError, match="x0 must be images"):
        du.invert_ddim(tiny_model, torch.zeros(1, 3, 8, 8), schedule)
    with pytest.raises(ValueError, match="n_steps"):
        du.invert_ddim(tiny_model, torch.zeros(1, 3, 16, 16), schedule, n_steps=0)
    with pytest.raises(ValueError, match="x_T must have shape"):
        du.sample_ddim(tiny_model, 2, schedule, x_T=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="x_T holds NaN"):
        du.sample_dpm_solver(tiny_model, 1, schedule, x_T=torch.full((1, 3, 16, 16), float("nan")))


def test_slerp_endpoints_norm_and_angle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    b = b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(du.slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(du.slerp(a, b, 1.0), b, atol=1e-5)
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    theta = torch.arccos((fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)))
    for t in (0.25, 0.5, 0.9):
        m = du.slerp(a, b, t).flatten(1).double()
        assert torch.allclose(m.norm(dim=1), fa.norm(dim=1), rtol=1e-5)  # stays on the sphere
        angle = torch.arccos((m * fa).sum(1) / (m.norm(dim=1) * fa.norm(dim=1)))
        assert torch.allclose(angle, t * theta, atol=1e-4)  # constant angular speed
    lerp_norm = (0.5 * (fa + fb)).norm(dim=1)
    assert bool((lerp_norm < 0.8 * fa.norm(dim=1)).all())  # what slerp avoids
    assert torch.allclose(du.slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-5)  # parallel: a straight line


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), "0.5", True])
def test_slerp_refuses_t_outside_0_1(t):
    with pytest.raises(ValueError, match="t must be a number in"):
        du.slerp(torch.ones(1, 3), torch.zeros(1, 3), t)


def test_slerp_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        du.slerp(torch.ones(2, 3), torch.ones(1, 3), 0.5)


def half_mask(shape=(1, 1, 16, 16)):
    mask = torch.zeros(shape)
    mask[..., :8, :] = 1  # the top half is known
    return mask


def test_inpainting_keeps_the_known_pixels_exactly(schedule, tiny_model):
    x_known = torch.rand(3, 3, 16, 16) * 2 - 1
    for mask in (half_mask(), half_mask((3, 3, 16, 16))):
        out, frames = du.inpaint(tiny_model, x_known, mask, schedule, n_steps=4, resample=2,
                                 generator=torch.Generator().manual_seed(0))
        known = mask.expand_as(x_known).bool()
        assert torch.equal(out[known], x_known[known])
        assert not torch.allclose(out[~known], x_known[~known])  # the rest was made by the model
        assert frames.shape == (5, 3, 3, 16, 16)


def test_inpainting_with_the_true_noise_restores_the_image(schedule):
    # The oracle knows the only image there is, so whatever the mask, the filled-in part is x0 too.
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    out, _ = du.inpaint(OracleUnet(x0, schedule), x0, half_mask(), schedule, n_steps=10, resample=3,
                        generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-4)


def test_inpainting_resampling_costs_network_calls(schedule, tiny_model):
    calls = []
    tiny_model.register_forward_hook(lambda *a: calls.append(1))
    du.inpaint(tiny_model, torch.zeros(1, 3, 16, 16), half_mask(), schedule, n_steps=3, resample=4)
    assert len(calls) == 12


@pytest.mark.parametrize("mask, match", [
    (torch.full((1, 1, 16, 16), 0.5), "only 0"),
    (torch.ones(1, 1, 8, 8), "mask must have shape"),
    (torch.ones(2, 1, 16, 16), "mask must have shape"),  # x_known holds 3 images
    (torch.ones(16, 16), "mask must have shape"),
])
def test_inpainting_refuses_bad_masks(schedule, tiny_model, mask, match):
    with pytest.raises(ValueError, match=match):
        du.inpaint(tiny_model, torch.zeros(3, 3, 16, 16), mask, schedule, n_steps=2)


def test_inpainting_refuses_bad_images_and_options(schedule, tiny_model):
    mask = half_mask()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        du.inpaint(tiny_model, torch.full((1, 3, 16, 16), 200.0), mask, schedule)
    with pytest.raises(ValueError, match="x_known must have shape"):
        du.inpaint(tiny_model, torch.zeros(1, 3, 8, 8), mask, schedule)
    with pytest.raises(ValueError, match="x_known must hold floats"):
        du.inpaint(tiny_model, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), mask, schedule)
    with pytest.raises(ValueError, match="resample"):
        du.inpaint(tiny_model, torch.zeros(1, 3, 16, 16), mask, schedule, resample=0)
    for n in (0, 501):
        with pytest.raises(ValueError, match="n_steps"):
            du.inpaint(tiny_model, torch.zeros(1, 3, 16, 16), mask, schedule, n_steps=n)


def test_logsnr_timesteps_are_even_in_lambda(schedule):
    for n in (1, 2, 5, 10, 25):
        steps = du.logsnr_timesteps(schedule, n)
        assert steps[0] == schedule.T and steps[-1] == 0 and len(steps) == n + 1
        assert all(a > b for a, b in zip(steps, steps[1:]))
    ab = [float(schedule.ab_t[t]) for t in du.logsnr_timesteps(schedule, 10)[:-1]]
    lam = [0.5 * math.log(a / (1 - a)) for a in ab]
    gaps = [b - a for a, b in zip(lam, lam[1:])]
    assert max(gaps) / min(gaps) < 1.3, gaps  # even up to integer rounding
    with pytest.raises(ValueError, match="n_steps"):
        du.logsnr_timesteps(schedule, 0)


@pytest.mark.parametrize("n_steps", [1, 2, 5, 10])
def test_dpm_solver_with_the_true_noise_lands_on_x0(schedule, n_steps):
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    out, frames = du.sample_dpm_solver(OracleUnet(x0, schedule), 2, schedule, n_steps=n_steps,
                                       generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-4) and len(frames) == n_steps + 1


def test_dpm_solver_first_step_is_a_ddim_step(schedule, tiny_model):
    # One step to t = 0 is first order: DPM-Solver++ and DDIM coincide.
    a, _ = du.sample_dpm_solver(tiny_model, 2, schedule, n_steps=1, generator=torch.Generator().manual_seed(0))
    b, _ = du.sample_ddim(tiny_model, 2, schedule, n_steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-6)


def test_dpm_solver_is_second_order_on_the_exact_ode(schedule, gaussian):
    z = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = gaussian.ode_map(z, schedule.T, 0)

    def error(sampler, n):
        out, _ = sampler(gaussian, 6, schedule, n_steps=n, x_T=z)
        return float((out - exact).abs().max())

    dpm = [error(du.sample_dpm_solver, n) for n in (10, 20)]
    ddim = [error(du.sample_ddim, n) for n in (10, 20)]
    assert dpm[1] / dpm[0] < 0.35, dpm  # a second-order method: halving the step cuts the error ~4x
    assert ddim[1] / ddim[0] > 0.4, ddim  # DDIM is first order: ~2x
    assert dpm[0] < ddim[0] / 1.5
