"""Notebook 8: flow matching. The conversions, the flow time, the loss, the Euler step and sampler against
independent formulas (numpy, hand-derived cases), DDIM = Euler on the shipped model, training a flow model
from the command line, and clear errors for bad input."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusion_utilities as du
from course_tools import cli
from course_tools.metrics import generate
from course_tools.training import TrainConfig, run_training

KINDS = du.PREDICTIONS


def pair(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=g, dtype=dtype), torch.randn(4, 3, 16, 16, generator=g, dtype=dtype)


def definitions(x0, eps, alpha, sigma):
    """Each kind of prediction straight from its definition (Salimans & Ho 2022 for v; u = eps - x0)."""
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "u": eps - x0}


@pytest.mark.parametrize("alpha, sigma", [(0.9, 0.43588989), (0.3, 0.7), (0.063, 0.998), (1.3, 0.2)],
                         ids=["ddpm-early", "straight", "ddpm-end", "neither"])
@pytest.mark.parametrize("source", KINDS)
def test_every_conversion_matches_the_definitions(source, alpha, sigma):
    x0, eps = pair()
    x_t, want = alpha * x0 + sigma * eps, definitions(x0, eps, alpha, sigma)
    for target in KINDS:
        got = du.convert_prediction(want[source], x_t, alpha, sigma, source=source, target=target)
        assert torch.allclose(got, want[target], atol=1e-10), (source, target)


def test_velocity_from_the_shipped_models_v_by_the_closed_form():
    """On DDPM's path (alpha^2 + sigma^2 = 1): u = (alpha + sigma) v + (sigma - alpha) x_t, derived by hand."""
    sched = du.make_schedule(500, terminal_signal=0.004)
    x0, eps = pair(1)
    for t in (1, 100, 250, 500):
        a, s = float(sched.ab_t[t].sqrt()), float((1 - sched.ab_t[t]).sqrt())
        x_t, v = a * x0 + s * eps, a * eps - s * x0
        u = du.convert_prediction(v, x_t, a, s, source="v", target="u")
        assert torch.allclose(u, (a + s) * v + (s - a) * x_t, atol=1e-5)
        assert torch.allclose(u, eps - x0, atol=1e-5)


def test_flow_time_puts_ddpm_states_on_the_straight_path():
    x0, eps = pair(2, torch.float32)
    for kwargs, known in [({"terminal_signal": 0.004}, {1: 0.012, 100: 0.337, 250: 0.641, 500: 0.996}),
                          ({}, {1: 0.012, 100: 0.327, 250: 0.617, 500: 0.926})]:  # values from the reference table
        sched = du.make_schedule(500, **kwargs)
        for t, s_known in known.items():
            s, scale = du.flow_time(t, sched)
            assert abs(float(s) - s_known) < 1e-3
            z = du.perturb_input(x0, t, eps, sched) / scale
            assert torch.allclose(z, (1 - s) * x0 + s * eps, atol=1e-5)
    s, _ = du.flow_time(torch.tensor([0, 10, 500]), sched)
    assert s.shape == (3,) and float(s[0]) == 0.0 and bool((s.diff() > 0).all())


class Linear(nn.Module):
    """A stand-in network whose output is a known function: out = a * x + b * t, ignoring the context."""
    in_channels, height, n_cfeat = 3, 16, 5

    def __init__(self, prediction, a=-0.7, b=0.3):
        super().__init__()
        self.prediction, self.a, self.b = prediction, a, b
        self.w = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the stand-in a device

    def forward(self, x, t, c=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.a * x + self.b * t + 0 * self.w


def test_euler_step_against_numpy():
    z, u = pair(3)
    for s, s_next in [(1.0, 0.9), (0.5, 0.0), (0.3, 0.29)]:
        want = z.numpy() + (s_next - s) * u.numpy()
        np.testing.assert_allclose(du.euler_step(z, s, s_next, u).numpy(), want, rtol=0, atol=1e-12)


def test_sample_flow_is_eulers_method_in_numpy():
    net, n_steps = Linear("u"), 7
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    got, frames, grid = du.sample_flow(net, 2, n_steps=n_steps, x_T=x_T)
    z, s = x_T.double().numpy(), np.linspace(1, 0, n_steps + 1)
    for k in range(n_steps):
        z = z + (s[k + 1] - s[k]) * (net.a * z + net.b * s[k])
    np.testing.assert_allclose(got.numpy(), z, atol=1e-5)
    np.testing.assert_allclose(grid, s, atol=1e-7)
    assert frames.shape == (n_steps + 1, 2, 3, 16, 16)


def test_guidance_in_sample_flow_extrapolates_the_velocity():
    """u = (1 + w) u(c) - w u(0): with a network that adds its context's first entry, w scales that part."""
    class Ctx(Linear):
        def forward(self, x, t, c=None):
            return super().forward(x, t) + (0 if c is None else c[:, :1, None, None])

    x_T = torch.zeros(1, 3, 16, 16)
    for w in (0.0, 2.0):
        got = du.sample_flow(Ctx("u", a=0.0, b=0.0), 1, n_steps=4, context=torch.tensor([0]), guide_w=w, x_T=x_T)[0]
        assert torch.allclose(got, torch.full_like(got, -(1 + w)))  # Euler from s = 1 to 0 with u = 1 + w


@pytest.mark.parametrize("n_steps", [5, 10, 25])
def test_ddim_is_euler_on_the_straight_path_with_the_shipped_model(n_steps):
    model, g = du.load_pretrained("sprites", "cpu"), torch.Generator().manual_seed(0)
    sched = du.model_schedule(model)
    x_T, classes = torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 5
    ddim, _ = du.sample_ddim(model, 8, sched, n_steps=n_steps, context=classes, x_T=x_T)
    euler, frames, grid = du.sample_flow(model, 8, sched, n_steps=n_steps, context=classes, x_T=x_T)
    assert float((ddim - euler).abs().max()) < 1e-4  # fp32 rounding: measured 2e-6 to 4e-6
    assert grid[0] == pytest.approx(0.996, abs=1e-3) and grid[-1] == 0
    assert np.allclose(frames[0], (x_T / du.flow_time(500, sched)[1]).numpy())
    # Guidance extrapolates (1 + w) times the conditional output, and at 25 steps a few pixels grow their
    # rounding to 5e-4 (measured); the typical pixel stays at rounding.
    ddim, _ = du.sample_ddim(model, 8, sched, n_steps=n_steps, context=classes, guide_w=2.0, x_T=x_T)
    euler, _, _ = du.sample_flow(model, 8, sched, n_steps=n_steps, context=classes, guide_w=2.0, x_T=x_T)
    assert float((ddim - euler).abs().mean()) < 1e-5 and float((ddim - euler).abs().max()) < 5e-3


def test_ddim_is_euler_in_float64_with_a_stand_in_network():
    """An identity, not an approximation: in float64 the two agree to rounding, for any network."""
    sched = du.make_schedule(500)
    ab = sched.ab_t.double()
    sched64 = du.Schedule(sched.b_t.double(), sched.a_t.double(), ab)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    s = sigma / (alpha + sigma)
    net = Linear("eps").double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grid = du.ddim_timesteps(500, 10)
    ddim, z = x, x / (alpha[500] + sigma[500])
    for t, t_next in zip(grid[:-1], grid[1:]):
        ddim = du.denoise_ddim(ddim, t, t_next, net(ddim, t / 500), sched64)
        x_t = z * (alpha[t] + sigma[t])
        u = du.convert_prediction(net(x_t, t / 500), x_t, alpha[t], sigma[t], source="eps", target="u")
        z = du.euler_step(z, float(s[t]), float(s[t_next]), u)
    assert float((ddim - z).abs().max()) < 1e-10
    wrong = x  # Euler in s on x_t itself, without the rescaling: a different sampler
    for t, t_next in zip(grid[:-1], grid[1:]):
        u = du.convert_prediction(net(wrong, t / 500), wrong, alpha[t], sigma[t], source="eps", target="u")
        wrong = du.euler_step(wrong, float(s[t]), float(s[t_next]), u)
    assert float((ddim - wrong).abs().max()) > 0.1


def test_flow_loss_against_its_definition():
    torch.manual_seed(0)
    net = du.ContextUnet(n_feat=8, prediction="u").eval()
    x, c = torch.rand(6, 3, 16, 16) * 2 - 1, du.one_hot(torch.arange(6) % 5)
    for sampling in ("uniform", "logit-normal"):
        got = du.flow_loss(net, x, c, drop_prob=0.5, time_sampling=sampling, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        s = torch.rand(6, generator=g) if sampling == "uniform" else torch.sigmoid(torch.randn(6, generator=g))
        eps = torch.randn(x.shape, generator=g)
        keep = (torch.rand(6, generator=g) >= 0.5).float()
        x_s = (1 - s.view(-1, 1, 1, 1)) * x + s.view(-1, 1, 1, 1) * eps
        assert torch.allclose(got, F.mse_loss(net(x_s, s, c * keep[:, None]), eps - x))


def test_logit_normal_time_sampling_favours_the_middle():
    net = Linear("u")
    seen = []
    net.forward = lambda x, t, c=None: seen.append(t) or torch.zeros_like(x)
    x = torch.zeros(4000, 3, 16, 16)
    du.flow_loss(net, x, None, time_sampling="logit-normal", generator=torch.Generator().manual_seed(0))
    s = seen[0]
    assert abs(float(s.median()) - 0.5) < 0.02 and float(((s < 0.1) | (s > 0.9)).float().mean()) < 0.04  # 2.8%
    du.flow_loss(net, x, None, time_sampling="uniform", generator=torch.Generator().manual_seed(0))
    assert 0.18 < float(((seen[1] < 0.1) | (seen[1] > 0.9)).float().mean()) < 0.22


def test_training_a_flow_model_from_the_command_line(tiny_npz, tmp_path):
    out = tmp_path / "flow"
    cli.main(["train", "--objective", "flow", "--out", str(out), "--steps", "3", "--batch-size", "4", "--n-feat", "8",
              "--data", str(tiny_npz), "--device", "cpu", "--warmup", "1"])
    model = du.load_model(out / "ema.pt", "cpu")
    assert model.prediction == "u" and model.schedule_args == {}
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["config"]["objective"] == "flow" and ck["config"]["t_sampling"] == "logit-normal"
    x, _, _ = du.sample_flow(model, 2, n_steps=2, context=torch.tensor([0, 1]), guide_w=1.0)
    assert x.shape == (2, 3, 16, 16) and bool(torch.isfinite(x).all())
    x, _ = generate(model, None, [0, 1, 2], "euler", 2, progress=False)
    assert x.shape == (3, 3, 16, 16)
    sample = ["sample", "--weights", str(out / "ema.pt"), "--per-class", "1", "--steps", "2", "--device", "cpu"]
    cli.main(sample + ["--out", str(tmp_path / "flow.png")])
    assert (tmp_path / "flow.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="Euler's method"):
        cli.main(sample + ["--out", str(tmp_path / "no.png"), "--eta", "1"])


def test_flow_training_reduces_the_loss():
    torch.manual_seed(0)
    images, labels, _ = du.load_sprites()
    net = du.ContextUnet(n_feat=16, prediction="u")
    batches = du.sprite_batches(images, labels, batch_size=32, generator=torch.Generator().manual_seed(0))
    _, losses = du.train(net, batches, None, steps=30, warmup=3, lr=3e-3, loss_fn=du.flow_loss, progress=False)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_straightness_of_known_paths():
    z0 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64).numpy()
    z1 = np.zeros_like(z0)
    s = np.array([1.0, 0.6, 0.25, 0.0])
    line = np.stack([z1 + (z0 - z1) * si for si in s])   # a straight path, unevenly sampled
    assert du.straightness(line, s)[0] == pytest.approx(0, abs=1e-12)
    bent = np.stack([z0, z0 * 0 + 1.0, z1])               # through a detour at s = 0.5
    steps = [(bent[1] - bent[0]) / -0.5, (bent[2] - bent[1]) / -0.5]
    chord = (bent[2] - bent[0]) / -1.0
    want = sum(0.5 * ((st - chord) ** 2).sum() for st in steps) / (chord ** 2).sum()
    assert du.straightness(bent, [1.0, 0.5, 0.0])[0] == pytest.approx(want, rel=1e-9)


# -- bad input ----------------------------------------------------------------------------------------

def test_bad_input_gets_clear_errors():
    z = torch.zeros(2, 3, 16, 16)
    sched = du.make_schedule(500)
    with pytest.raises(ValueError, match="need 0 <= s_next < s <= 1"):
        du.euler_step(z, 0.2, 0.5, z)                         # time running the wrong way
    with pytest.raises(ValueError, match="need 0 <= s_next < s <= 1"):
        du.euler_step(z, 1.5, 0.5, z)
    with pytest.raises(ValueError, match="u must have the shape of z"):
        du.euler_step(z, 1.0, 0.5, z[:1])
    with pytest.raises(ValueError, match="integer steps in 0..500"):
        du.flow_time(501, sched)
    with pytest.raises(ValueError, match="integer steps"):
        du.flow_time(0.5, sched)
    with pytest.raises(ValueError, match="source must be one of"):
        du.convert_prediction(z, z, 0.5, 0.5, source="noise", target="u")
    with pytest.raises(ValueError, match="n_steps must be an integer"):
        du.sample_flow(Linear("u"), 2, n_steps=-3)
    with pytest.raises(ValueError, match="n_steps must be an integer"):
        du.sample_flow(Linear("v"), 2, sched, n_steps=0)
    with pytest.raises(ValueError, match="x_T must have shape"):
        du.sample_flow(Linear("u"), 2, n_steps=3, x_T=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="pass it"):
        du.sample_flow(Linear("v"), 2, n_steps=3)             # a diffusion model without its schedule
    with pytest.raises(ValueError, match="sample it with du.sample_flow"):
        du.sample_ddim(Linear("u"), 2, sched, n_steps=3)      # a flow model in a diffusion sampler
    with pytest.raises(ValueError, match="time_sampling"):
        du.flow_loss(Linear("u"), z, None, time_sampling="lognormal")
    with pytest.raises(ValueError, match="need frames"):
        du.straightness(np.zeros((3, 2, 3, 16, 16)), [1.0, 0.0])
    with pytest.raises(ValueError, match="--objective flow trains a velocity network"):
        TrainConfig(objective="flow", prediction="u", snr_gamma=5.0)
    with pytest.raises(ValueError, match="--prediction"):
        TrainConfig(prediction="u")                             # a velocity network needs the flow objective
    with pytest.raises(ValueError, match="--objective"):
        TrainConfig(objective="rectified")
    with pytest.raises(ValueError, match="guide_interval"):
        generate(Linear("u"), None, [0], "euler", 2, guide_interval=(0, 100), progress=False)


def test_a_resumed_run_must_keep_its_objective(tiny_npz, tmp_path):
    common = dict(steps=2, batch_size=4, n_feat=8, warmup=1)
    run_training(TrainConfig(**common), tmp_path / "r", data_path=tiny_npz, progress=False, device="cpu", stop_at=1)
    flow = TrainConfig(objective="flow", prediction="u", snr_gamma=None, t_sampling="logit-normal", **common)
    with pytest.raises(ValueError, match="objective='diffusion' in the checkpoint, now 'flow'"):
        run_training(flow, tmp_path / "r", data_path=tiny_npz, resume=True, progress=False, device="cpu")
