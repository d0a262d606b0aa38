"""DDPM and DDIM steps and samplers, against independent formulas and an exact-noise oracle."""
import numpy as np
import pytest
import torch
from oracles import OracleUnet

import diffusion_utilities as du


def test_ddpm_step_known_numbers(schedule):
    # A hand computation in float64 with the textbook formula (Ho et al. 2020, Algorithm 2).
    t = 250
    b, a, ab = (float(v[t]) for v in (schedule.b_t, schedule.a_t, schedule.ab_t))
    x, eps, z = 0.3, -1.2, 0.5
    want = (x - eps * b / np.sqrt(1 - ab)) / np.sqrt(a) + np.sqrt(b) * z
    got = du.denoise_add_noise(torch.full((1, 1, 1, 1), x), t, torch.full((1, 1, 1, 1), eps), schedule,
                               z=torch.full((1, 1, 1, 1), z))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ddpm_mean_is_posterior_mean(schedule):
    # With the true noise, the DDPM mean equals the Gaussian posterior mean of q(x_{t-1} | x_t, x_0).
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in (1, 2, 100, 500):
        xt = du.perturb_input(x0, t, eps, schedule)
        ab, abp, a, b = (float(schedule.ab_t[t]), float(schedule.ab_t[t - 1]), float(schedule.a_t[t]),
                         float(schedule.b_t[t]))
        mu = np.sqrt(abp) * b / (1 - ab) * x0 + np.sqrt(a) * (1 - abp) / (1 - ab) * xt
        got = du.denoise_add_noise(xt, t, eps, schedule, z=torch.zeros_like(xt))
        # float32 holds ab_t near 1 to ~6e-8, so 1 - ab_t at t = 1 is good to ~4e-4 relative
        assert torch.allclose(got, mu, rtol=1e-3, atol=1e-3), t


def test_ddim_step_known_numbers(schedule):
    t, tp = 300, 120
    ab, abp = float(schedule.ab_t[t]), float(schedule.ab_t[tp])
    x, eps, z, eta = 0.8, 0.4, -0.7, 0.5
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
    want = np.sqrt(abp) * x0 + np.sqrt(1 - abp - sigma ** 2) * eps + sigma * z
    one = torch.ones(1, 1, 1, 1)
    got = du.denoise_ddim(x * one, t, tp, eps * one, schedule, eta=eta, z=z * one)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ddim_with_true_noise_lands_on_perturbed_x0(schedule):
    # eta = 0 moves x_t along the same noise direction: x_{t'} = perturb(x0, t', eps), t' = 0 gives x0.
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    xt = du.perturb_input(x0, 400, eps, schedule)
    for tp in (399, 200, 1, 0):
        assert torch.allclose(du.denoise_ddim(xt, 400, tp, eps, schedule),
                              du.perturb_input(x0, tp, eps, schedule), atol=1e-4)


def test_ddim_eta1_matches_ddpm_variance(schedule):
    # With eta = 1 and t_prev = t - 1, sigma^2 is the DDPM posterior variance (1-ab_prev)/(1-ab) * b_t.
    t = 200
    x, eps = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    z = torch.ones(1, 1, 1, 1)
    noisy = du.denoise_ddim(x, t, t - 1, eps, schedule, eta=1.0, z=z)
    clean = du.denoise_ddim(x, t, t - 1, eps, schedule, eta=1.0, z=torch.zeros_like(z))
    ab, abp, b = float(schedule.ab_t[t]), float(schedule.ab_t[t - 1]), float(schedule.b_t[t])
    assert (noisy - clean).item() == pytest.approx(np.sqrt((1 - abp) / (1 - ab) * b), rel=1e-4)


def test_ddim_timesteps_every_step_count():
    for n in range(1, 501):
        ts = du.ddim_timesteps(500, n)
        assert len(ts) == n + 1 and ts[0] == 500 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    assert du.ddim_timesteps(500, 3) == [500, 333, 167, 0]


@pytest.mark.parametrize("n_steps", [1, 3, 7, 25, 30, 40, 60, 499, 500])
def test_sample_ddim_oracle_reaches_data_for_any_step_count(schedule, n_steps):
    # The course's sampler re-noised its output when n_steps did not divide T (e.g. 30, 40, 60).
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    oracle = OracleUnet(x0, schedule)
    out, frames = du.sample_ddim(oracle, 2, schedule, n_steps=n_steps, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0.expand(2, -1, -1, -1), atol=1e-3)
    assert frames.shape == (n_steps + 1, 2, 3, 8, 8)


def test_sample_ddpm_oracle_reaches_data():
    s = du.make_schedule(50)
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    out, frames = du.sample_ddpm(OracleUnet(x0, s), 3, s, save_rate=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0.expand(3, -1, -1, -1), atol=1e-3)
    # x_T, then t-1 in {40, 30, 20, 10, 0} and the last steps t-1 < 8 (0 counted once)
    assert frames.shape[0] == 1 + len({k for k in range(50) if k % 10 == 0 or k < 8})
    assert np.allclose(frames[-1], out.numpy())


def test_seeded_sampling_is_reproducible(tiny_model):
    s = du.make_schedule(20)
    a, _ = du.sample_ddpm(tiny_model, 4, s, context=torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(7))
    b, _ = du.sample_ddpm(tiny_model, 4, s, context=torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(7))
    c, _ = du.sample_ddpm(tiny_model, 4, s, context=torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d, _ = du.sample_ddim(tiny_model, 4, s, n_steps=5, eta=1.0, generator=torch.Generator().manual_seed(7))
    e, _ = du.sample_ddim(tiny_model, 4, s, n_steps=5, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(d, e)


def test_ddim_eta0_is_deterministic_given_start(tiny_model):
    # Same starting noise, eta = 0: the same images, even with the global RNG moved on.
    s = du.make_schedule(20)
    a, _ = du.sample_ddim(tiny_model, 3, s, n_steps=4, generator=torch.Generator().manual_seed(3))
    torch.randn(100)
    b, _ = du.sample_ddim(tiny_model, 3, s, n_steps=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_incorrect_sampler_never_adds_noise(tiny_model):
    s = du.make_schedule(20)
    a, _ = du.sample_ddpm_incorrect(tiny_model, 2, s, generator=torch.Generator().manual_seed(0))
    b, _ = du.sample_ddpm(tiny_model, 2, s, generator=torch.Generator().manual_seed(0), add_noise=False)
    assert torch.equal(a, b)
    c, _ = du.sample_ddpm(tiny_model, 2, s, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, c)


class ContextEcho(du.ContextUnet):
    """eps(x, c) = the first context entry everywhere, so guidance arithmetic is visible."""

    def __init__(self):
        super().__init__(n_feat=8)

    def forward(self, x, t, c=None):
        c = torch.zeros(x.shape[0], 5) if c is None else c
        return c[:, :1, None, None].expand_as(x) * 1.0 + 0.25


def test_classifier_free_guidance_formula(schedule):
    m = ContextEcho()
    x = torch.zeros(2, 3, 16, 16)
    ctx = du.one_hot(torch.tensor([0, 1]))
    for w in (0.0, 1.0, 3.0):
        eps = du.predict_noise(m, x, 100, schedule, ctx, w)
        e_c = ctx[:, 0].view(2, 1, 1, 1) + 0.25
        assert torch.allclose(eps, ((1 + w) * e_c - w * 0.25).expand_as(x))


def test_guidance_interval_guides_only_inside_it(schedule):
    # Kynkaenniemi et al. 2024: outside [low, high] the estimate is the plain conditional one (w = 0).
    m = ContextEcho()
    x = torch.zeros(2, 3, 16, 16)
    ctx = du.one_hot(torch.tensor([0, 1]))
    e_c = (ctx[:, 0].view(2, 1, 1, 1) + 0.25).expand_as(x)
    for t, guided in [(0, False), (99, False), (100, True), (250, True), (300, True), (301, False), (500, False)]:
        eps = du.predict_noise(m, x, t, schedule, ctx, 3.0, guide_interval=(100, 300))
        want = 4 * e_c - 3 * 0.25 if guided else e_c
        assert torch.allclose(eps, want), t


class ContextPattern(du.ContextUnet):
    """out(x, c) = c_0 * P + Q for two fixed random fields P, Q: conditional and unconditional outputs
    with different spreads, so a guidance rescale has something to undo."""

    def __init__(self):
        super().__init__(n_feat=8)
        g = torch.Generator().manual_seed(5)
        self.P, self.Q = torch.randn(3, 16, 16, generator=g), 0.3 * torch.randn(3, 16, 16, generator=g)

    def forward(self, x, t, c=None):
        c = torch.zeros(x.shape[0], 5) if c is None else c
        return c[:, :1, None, None] * self.P + self.Q


def test_guidance_rescale_against_numpy(schedule):
    # Lin et al. 2024, sec. 3.4: g = (1 + w) cond - w uncond; out = phi g std(cond) / std(g) + (1 - phi) g,
    # std over each sample's values (numpy's population std: the ratio does not depend on the ddof).
    m = ContextPattern()
    x = torch.zeros(2, 3, 16, 16)
    ctx = du.one_hot(torch.tensor([0, 1]))
    P, Q, c0 = m.P.numpy(), m.Q.numpy(), ctx[:, 0].numpy()
    for w, phi in [(2.0, 0.0), (2.0, 0.7), (4.0, 1.0)]:
        out = du.predict_noise(m, x, 100, schedule, ctx, w, guide_rescale=phi).numpy()
        for i in range(2):
            cond = c0[i] * P + Q
            g = (1 + w) * cond - w * Q
            want = phi * g * cond.std() / g.std() + (1 - phi) * g
            np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-6)
    full = du.predict_noise(m, x, 100, schedule, ctx, 4.0, guide_rescale=1.0)
    cond = du.predict_noise(m, x, 100, schedule, ctx, 0.0)
    # full rescale: the guided output keeps the conditional output's spread, whatever w
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)


def test_guidance_rescale_in_the_samplers(tiny_model):
    s = du.make_schedule(10)
    ctx = torch.tensor([0, 4])
    for sampler, steps in [(du.sample_ddpm, {}), (du.sample_ddim, {"n_steps": 4}), (du.sample_dpm_solver, {"n_steps": 4})]:
        def run(**kw):
            return sampler(tiny_model, 2, s, context=ctx, generator=torch.Generator().manual_seed(2), **steps, **kw)[0]

        assert torch.equal(run(guide_w=2.0, guide_rescale=0.0), run(guide_w=2.0)), sampler.__name__
        assert torch.equal(run(guide_w=0.0, guide_rescale=1.0), run()), sampler.__name__  # nothing to rescale
        assert not torch.allclose(run(guide_w=2.0, guide_rescale=1.0), run(guide_w=2.0)), sampler.__name__


def test_guidance_interval_in_the_samplers(tiny_model):
    s = du.make_schedule(10)  # DDIM-3 visits t = 10, 7, 3: no step lies in 4..6, every step in 0..10
    ctx = torch.tensor([0, 4])

    def ddim(**kw):
        return du.sample_ddim(tiny_model, 2, s, n_steps=3, context=ctx, generator=torch.Generator().manual_seed(0), **kw)[0]

    assert torch.equal(ddim(guide_w=2.0, guide_interval=(0, 10)), ddim(guide_w=2.0))
    assert torch.equal(ddim(guide_w=2.0, guide_interval=(4, 6)), ddim())
    assert not torch.allclose(ddim(guide_w=2.0, guide_interval=(5, 10)), ddim(guide_w=2.0))
    for sampler in (du.sample_ddpm, du.sample_dpm_solver):
        a, _ = sampler(tiny_model, 2, s, context=ctx, guide_w=2.0, guide_interval=(0, 10),
                       generator=torch.Generator().manual_seed(1))
        b, _ = sampler(tiny_model, 2, s, context=ctx, guide_w=2.0, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b), sampler.__name__


def test_guidance_changes_samples_and_mode_is_restored(tiny_model):
    s = du.make_schedule(10)
    tiny_model.train()
    a, _ = du.sample_ddim(tiny_model, 2, s, n_steps=3, context=torch.tensor([0, 4]), generator=torch.Generator().manual_seed(0))
    b, _ = du.sample_ddim(tiny_model, 2, s, n_steps=3, context=torch.tensor([0, 4]), guide_w=2.0,
                          generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)
    assert tiny_model.training  # sampling ran in eval mode and put the mode back


def test_bad_sampler_input(tiny_model, schedule):
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="n_steps"):
        du.sample_ddim(tiny_model, 2, schedule, n_steps=0)
    with pytest.raises(ValueError, match="n_steps"):
        du.sample_ddim(tiny_model, 2, schedule, n_steps=501)
    with pytest.raises(ValueError, match="eta"):
        du.sample_ddim(tiny_model, 2, schedule, eta=-0.1)
    with pytest.raises(ValueError, match="eta"):
        du.denoise_ddim(x, 10, 5, x, schedule, eta=-1)
    with pytest.raises(ValueError, match="t_prev must lie in 0..500"):
        du.denoise_ddim(x, 10, -4, x, schedule)
    with pytest.raises(ValueError, match="smaller than t"):
        du.denoise_ddim(x, 10, 10, x, schedule)
    with pytest.raises(ValueError, match="t must lie in 1..500"):
        du.denoise_add_noise(x, 0, x, schedule)
    with pytest.raises(ValueError, match="t must lie in 1..500"):
        du.denoise_ddim(x, 501, 0, x, schedule)
    with pytest.raises(ValueError, match="pred_noise"):
        du.denoise_add_noise(x, 3, x[:1], schedule)
    with pytest.raises(ValueError, match="context"):
        du.sample_ddpm(tiny_model, 2, schedule, context=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="class ids"):
        du.sample_ddim(tiny_model, 2, schedule, context=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="guidance"):
        du.sample_ddim(tiny_model, 2, schedule, guide_w=1.0)
    with pytest.raises(ValueError, match="n_sample"):
        du.sample_ddim(tiny_model, 0, schedule)
