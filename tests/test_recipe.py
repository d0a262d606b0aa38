"""The training recipe's options: v-prediction, Min-SNR weighting, t sampling, input perturbation,
GroupNorm and a zero-initialised output, each against an independent formula."""
import numpy as np
import pytest
import torch
from oracles import OracleUnet

import diffusion_utilities as du
from course_tools.runs import save_atomic, weights_payload
from course_tools.training import PerturbedInputs, TrainConfig, run_training, timestep_probabilities


class VOracle(OracleUnet):
    """The exact-noise oracle, answering in v = sqrt(ab) eps - sqrt(1 - ab) x0 instead of eps."""

    def __init__(self, x0, schedule):
        super().__init__(x0, schedule)
        self.prediction = "v"

    def forward(self, x, t, c=None):
        eps = super().forward(x, t, c)
        t_int = torch.round(torch.as_tensor(t).reshape(-1) * self.schedule.T).long().expand(x.shape[0])
        ab = self.schedule.ab_t[t_int].view(-1, 1, 1, 1)
        return ab.sqrt() * eps - (1 - ab).sqrt() * self.x0


def test_velocity_known_numbers(schedule):
    t = 137
    ab = float(schedule.ab_t[t])
    x0, eps = 0.4, -1.1
    got = du.velocity(torch.full((1, 1, 1, 1), x0), torch.full((1, 1, 1, 1), eps), t, schedule)
    assert got.item() == pytest.approx(np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, rel=1e-5)


@pytest.mark.parametrize("n_steps", [1, 7, 25, 500])
def test_v_model_samples_like_an_eps_model(schedule, n_steps):
    # predict_noise turns v back into eps, so every sampler brings the v-oracle to x0 as well.
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    out, _ = du.sample_ddim(VOracle(x0, schedule), 2, schedule, n_steps=n_steps,
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0.expand(2, -1, -1, -1), atol=1e-3)
    if n_steps == 500:
        out, _ = du.sample_ddpm(VOracle(x0, schedule), 2, schedule, add_noise=False,
                                generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, x0.expand(2, -1, -1, -1), atol=1e-3)


def test_v_guidance_equals_eps_guidance(schedule):
    # v and eps are linear in each other at fixed x_t, so guiding in either space is the same.
    torch.manual_seed(0)
    v_net = du.ContextUnet(n_feat=8, prediction="v").eval()
    x, c = torch.randn(3, 3, 16, 16), du.one_hot(torch.tensor([0, 1, 2]))
    t = 321
    ab = float(schedule.ab_t[t])
    tt = torch.full((3,), t / schedule.T)
    with torch.no_grad():
        v_c, v_u = v_net(x, tt, c), v_net(x, tt, None)
        got = du.predict_noise(v_net, x, t, schedule, c, guide_w=2.0)
    eps_c, eps_u = (np.sqrt(ab) * v + np.sqrt(1 - ab) * x for v in (v_c, v_u))
    assert torch.allclose(got, 3 * eps_c - 2 * eps_u, atol=1e-5)


def test_v_loss_target_is_velocity(schedule):
    # A network that answers 0 scores E[v^2] = ab + (1 - ab) E[x0^2]: 1 for unit-variance data.
    class Zero(du.ContextUnet):
        def forward(self, x, t, c=None):
            return torch.zeros_like(x)

    x = torch.where(torch.rand(4000, 3, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    net = Zero(n_feat=8, height=4, prediction="v")
    loss = du.diffusion_loss(net, x, None, schedule, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0, abs=0.02)
    # with x0 = 0 only the noise part is left: E[ab_t] over uniform t
    loss0 = du.diffusion_loss(net, torch.zeros(4000, 3, 4, 4), None, schedule,
                              generator=torch.Generator().manual_seed(0))
    assert loss0.item() == pytest.approx(float(schedule.ab_t[1:].mean()), abs=0.02)


def test_min_snr_weights(schedule):
    # Each image's squared error times min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v), with SNR = ab / (1 - ab).
    class Fixed(du.ContextUnet):
        def forward(self, x, t, c=None):
            seen.append(torch.round(t * schedule.T).long())
            return torch.zeros_like(x)

    for prediction in ("eps", "v"):
        seen = []
        net = Fixed(n_feat=8, prediction=prediction)
        x = torch.zeros(64, 3, 16, 16)
        g = torch.Generator().manual_seed(1)
        weighted = du.diffusion_loss(net, x, None, schedule, generator=g, snr_gamma=5.0)
        g = torch.Generator().manual_seed(1)
        t = torch.randint(1, schedule.T + 1, (64,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        ab = schedule.ab_t[t].double()
        target = noise if prediction == "eps" else ab.sqrt().view(-1, 1, 1, 1).float() * noise
        snr = ab / (1 - ab)
        w = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction == "eps" else snr + 1)
        want = (w * (target.double() ** 2).mean(dim=(1, 2, 3))).mean()
        assert torch.equal(seen[0], t)
        assert weighted.item() == pytest.approx(want.item(), rel=1e-4)


def test_lognormal_timesteps(schedule):
    p = timestep_probabilities(schedule, "lognormal")
    assert p.shape == (schedule.T,) and p.min() >= 0 and p.sum().item() == pytest.approx(1.0, abs=1e-5)
    # ln sigma ~ N(-1.2, 1.2^2), so half the draws have a noise level below sigma = exp(-1.2)
    log_sigma = 0.5 * torch.log((1 - schedule.ab_t[1:]) / schedule.ab_t[1:])
    median_t = int(torch.searchsorted(torch.cumsum(p, 0), torch.tensor(0.5)))
    assert float(log_sigma[median_t]) == pytest.approx(-1.2, abs=0.05)
    assert torch.allclose(timestep_probabilities(schedule, "uniform"), torch.full((500,), 1 / 500))
    with pytest.raises(ValueError, match="uniform"):
        timestep_probabilities(schedule, "cosine")
    # and the loss draws from it
    seen = []

    class Spy(du.ContextUnet):
        def forward(self, x, t, c=None):
            seen.append(torch.round(t * schedule.T).long())
            return torch.zeros_like(x)

    du.diffusion_loss(Spy(n_feat=8, height=4), torch.zeros(20000, 3, 4, 4), None, schedule, t_probs=p,
                      generator=torch.Generator().manual_seed(0))
    drawn = torch.bincount(seen[0] - 1, minlength=schedule.T).float() / 20000
    assert (drawn - p).abs().max() < 0.01
    assert float(np.median(seen[0].numpy())) == pytest.approx(median_t + 1, abs=8)


def test_input_perturbation_keeps_the_target(schedule):
    # The network sees x_t made from noise + gamma * extra, but the target is the noise alone.
    got = {}

    class Spy(du.ContextUnet):
        def forward(self, x, t, c=None):
            got["x_t"], got["t"] = x, torch.round(t * schedule.T).long()
            return torch.zeros_like(x)

    x = torch.rand(8, 3, 16, 16) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    loss = du.diffusion_loss(PerturbedInputs(Spy(n_feat=8), schedule, 0.1, gen), x, None, schedule, generator=gen)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 501, (8,), generator=g)
    noise, extra = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    assert torch.equal(got["t"], t)
    assert torch.allclose(got["x_t"], du.perturb_input(x, t, noise + 0.1 * extra, schedule), atol=1e-5)
    assert loss.item() == pytest.approx((noise ** 2).mean().item(), rel=1e-5)


def test_group_norm_and_zero_init(tiny_npz, tmp_path):
    torch.manual_seed(0)
    net = du.ContextUnet(n_feat=16, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    x = torch.randn(4, 3, 16, 16)
    cfg = TrainConfig(steps=1, batch_size=4, n_feat=8, warmup=1, zero_init=True, lr=1e-12)
    run_training(cfg, tmp_path / "z", data_path=tiny_npz, device="cpu", progress=False)
    zeroed = du.load_model(tmp_path / "z" / "ema.pt", "cpu")  # one step at a negligible learning rate
    assert zeroed(x, torch.rand(4)).abs().max() < 1e-6  # zero-initialised output: predicts 0 before training
    # GroupNorm treats each image alone: a sample's output does not depend on the rest of the batch
    net.out[-1].weight.data.normal_()
    net.train()
    alone, together = net(x[:1], torch.full((1,), 0.3)), net(x, torch.full((4,), 0.3))[:1]
    assert torch.allclose(alone, together, rtol=1e-4, atol=1e-4)
    bn = du.ContextUnet(n_feat=16).train()  # BatchNorm, by contrast, mixes the batch
    assert not torch.allclose(bn(x[:2], torch.full((2,), 0.3))[:1], bn(x, torch.full((4,), 0.3))[:1], atol=1e-3)
    with pytest.raises(ValueError, match="norm"):
        du.ContextUnet(n_feat=16, norm="layer")
    with pytest.raises(ValueError, match="prediction"):
        du.ContextUnet(n_feat=16, prediction="x0")


def test_load_model_reads_the_architecture(tmp_path):
    net = du.ContextUnet(n_feat=16, norm="group", prediction="v")
    save_atomic(weights_payload(net), tmp_path / "w.pt")
    back = du.load_model(tmp_path / "w.pt", "cpu")
    assert back.prediction == "v" and back.n_feat == 16 and back.settings["norm"] == "group"
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values()))


def test_ema_warmup_and_decay():
    m = torch.nn.Linear(2, 2)
    ema = du.EMA(m, decay=0.99, warmup=100)
    with torch.no_grad():
        m.weight.fill_(1.0)
    before = ema.model.weight.clone()
    ema.update(m)
    d = 2 / 101
    assert torch.allclose(ema.model.weight, d * before + (1 - d))
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="decay"):
            du.EMA(m, decay=bad)
