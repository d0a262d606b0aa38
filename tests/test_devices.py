"""Every public function works with the model on a GPU: on a stand-in CUDA device and a stand-in Apple
(MPS) device (tests/standin_device.py), tensors meet on one device, float64 stays on the CPU, and seeded
results equal the CPU's. Also: bf16 only where the hardware has it natively.
"""
import copy
import inspect

import numpy as np
import pytest
import torch
from standin_device import DeviceMismatch, OnStandin, StandinDevice

import diffusion_utilities as du
from course_tools import hardware
from course_tools.hardware import fast_settings
from course_tools.metrics import SpriteClassifier, classifier_outputs
from course_tools.training import TrainConfig, plan_steps, run_training, timestep_probabilities

KINDS = ["cuda", "mps"]


@pytest.fixture(scope="module")
def cpu_model():
    torch.manual_seed(0)
    return du.ContextUnet(n_feat=16, prediction="v", norm="group").eval()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


class FlowView(torch.nn.Module):
    """A diffusion network's weights seen as a flow model (prediction "u"): the velocity code paths, same shapes."""

    def __init__(self, net):
        super().__init__()
        self.net, self.prediction = net, "u"
        self.in_channels, self.height, self.n_cfeat = net.in_channels, net.height, net.n_cfeat

    def forward(self, x, t, c=None):
        return self.net(x, t, c)


def first(out):
    return out[0] if isinstance(out, tuple) else out


# Each case: name -> fn(model, schedule, device) returning a tensor or (tensor, frames). Inputs the
# learner would pass from the CPU (contexts, masks, x_known, x_T) are given on the CPU on purpose.
SCHEDULE = du.make_schedule(50, terminal_signal=0.004)  # 50 steps: the same code paths, 10x sooner
CTX = torch.arange(4) % 5
X0 = torch.rand(4, 3, 16, 16, generator=seeded(3)) * 2 - 1
CASES = {
    "sample_ddpm": lambda m, s, d: du.sample_ddpm(m, 4, s, context=CTX, guide_w=2.0, save_rate=25, generator=seeded(),
                                                  guide_interval=(0, 40), guide_rescale=0.7),
    "sample_ddpm_incorrect": lambda m, s, d: du.sample_ddpm_incorrect(m, 4, s, context=CTX, save_rate=25, generator=seeded()),
    "sample_ddim": lambda m, s, d: du.sample_ddim(m, 4, s, n_steps=5, eta=0.5, context=CTX, guide_w=2.0, generator=seeded()),
    "sample_dpm_solver": lambda m, s, d: du.sample_dpm_solver(m, 4, s, n_steps=5, context=CTX, guide_w=1.0,
                                                              generator=seeded()),
    "invert_ddim": lambda m, s, d: du.invert_ddim(m, X0, s, n_steps=5, context=CTX),
    "inpaint": lambda m, s, d: du.inpaint(m, X0, (torch.arange(16) < 8).float().expand(1, 1, 16, 16), s, n_steps=4,
                                          resample=2, context=CTX, generator=seeded()),
    "predict_noise": lambda m, s, d: du.predict_noise(m, X0.to(d), 30, s, du.one_hot(CTX).to(d), 2.0, guide_rescale=0.5),
    "diffusion_loss": lambda m, s, d: du.diffusion_loss(m, X0.to(d), du.one_hot(CTX).to(d), s.to(d), generator=seeded(),
                                                        snr_gamma=5.0, t_probs=timestep_probabilities(s.to(d), "lognormal")),
    "perturb_input": lambda m, s, d: du.perturb_input(X0.to(d), torch.tensor([1, 10, 30, 50]), torch.ones(4, 3, 16, 16).to(d), s),
    "predict_x0": lambda m, s, d: du.predict_x0(X0.to(d), 25, torch.ones(4, 3, 16, 16).to(d), s),
    "velocity": lambda m, s, d: du.velocity(X0.to(d), torch.ones(4, 3, 16, 16).to(d), torch.tensor([1, 2, 3, 4]).to(d), s),
    "denoise_add_noise": lambda m, s, d: du.denoise_add_noise(X0.to(d), 25, X0.to(d), s, z=torch.ones(4, 3, 16, 16).to(d)),
    "denoise_ddim": lambda m, s, d: du.denoise_ddim(X0.to(d), 25, 20, X0.to(d), s, eta=1.0, z=torch.ones(4, 3, 16, 16).to(d)),
    "posterior": lambda m, s, d: du.posterior(X0.to(d), X0.flip(0).to(d), 30, s.to(d))[0],
    "ddim_sigma": lambda m, s, d: du.ddim_sigma(torch.tensor([30, 20]).to(d), torch.tensor([10, 0]), 1.0, s.to(d)),
    "rescale_guidance": lambda m, s, d: du.rescale_guidance(2 * X0.to(d), X0.to(d), 0.7),
    "slerp": lambda m, s, d: du.slerp(X0.to(d), X0.flip(0).to(d), 0.3),
    "to_display": lambda m, s, d: torch.as_tensor(du.to_display(X0.to(d))),
    "image_grid": lambda m, s, d: torch.as_tensor(du.image_grid(X0.to(d), nrow=2)),
    "augment_batch": lambda m, s, d: du.augment_batch(X0.to(d), generator=seeded()),
    "sprite_batches": lambda m, s, d: next(du.sprite_batches(*du.load_sprites()[:2], batch_size=8, generator=seeded(),
                                                             device=d))[0],
    "sample_flow": lambda m, s, d: du.sample_flow(m, 4, s, n_steps=5, context=CTX, guide_w=2.0, generator=seeded()),
    "predict_velocity": lambda m, s, d: du.sample_flow(FlowView(m), 4, n_steps=3, context=CTX, guide_w=1.0,
                                                       generator=seeded()),  # a flow model: the velocity branch
    "flow_loss": lambda m, s, d: du.flow_loss(FlowView(m), X0.to(d), du.one_hot(CTX).to(d), generator=seeded()),
    "flow_time": lambda m, s, d: du.flow_time(torch.tensor([0, 10, 50]), s.to(d))[0],
    "convert_prediction": lambda m, s, d: du.convert_prediction(X0.to(d), X0.flip(0).to(d), 0.6, 0.8, source="v",
                                                                target="u"),
    "euler_step": lambda m, s, d: du.euler_step(X0.to(d), 0.5, 0.25, X0.flip(0).to(d)),
    "distillation_target": lambda m, s, d: du.distillation_target(
        m, X0, torch.tensor([50, 40, 30, 20]), torch.tensor([45, 35, 25, 15]), torch.tensor([40, 30, 20, 0]), s,
        context=CTX, guide_w=2.0),   # x_t and class ids from the CPU, as a learner passes them
    "distill_loss": lambda m, s, d: du.distill_loss(m, X0.to(d), du.one_hot(CTX).to(d), s, teacher=m, n_steps=2,
                                                    guide_w=2.0, generator=seeded()),
}
# Public functions that hold no tensors of their own, or that the cases above and the tests below cover.
ELSEWHERE = {
    "load_sprites", "find_data_file", "to_tensor_images", "one_hot", "get_device", "make_schedule", "make_norm",
    "count_parameters", "snr", "train_step", "lr_at", "class_sampling_weights", "train", "ddim_timesteps",
    "logsnr_timesteps", "show_images", "plot_sample", "animation_html", "read_weights", "load_model", "model_schedule",
    "read_manifest", "checked_entry", "load_pretrained", "straightness", "distillation_times",
}


def test_every_public_function_is_checked_on_a_device():
    public = {n for n, f in vars(du).items() if inspect.isfunction(f) and not n.startswith("_")
              and f.__module__ == du.__name__}
    unchecked = public - set(CASES) - ELSEWHERE
    assert not unchecked, f"add a device case for {sorted(unchecked)} in tests/test_devices.py"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_function_on_a_gpu_matches_the_cpu(name, kind, cpu_model):
    want = first(CASES[name](cpu_model, SCHEDULE, torch.device("cpu")))
    with StandinDevice(kind):
        model = copy.deepcopy(cpu_model).to(kind)
        got = first(CASES[name](model, SCHEDULE, torch.device(kind)))
        if isinstance(got, OnStandin):
            assert got.device.type == kind
            got = got.detach().cpu()
    want = want.detach() if torch.is_tensor(want) else want
    assert torch.allclose(torch.as_tensor(np.asarray(got)).float(), torch.as_tensor(np.asarray(want)).float(), atol=1e-5), name


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_ema_and_the_loop_on_a_gpu(kind, tmp_path, tiny_npz):
    with StandinDevice(kind):
        model = du.ContextUnet(n_feat=16).to(kind)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ema = du.EMA(model)
        x, c = X0.to(kind), du.one_hot(CTX).to(kind)
        model.autocast_dtype = fast_settings(kind)[0]
        loss = du.train_step(model, opt, x, c, SCHEDULE.to(kind), generator=seeded())
        ema.update(model)
        assert np.isfinite(loss)
        images, labels, _ = du.load_sprites(tiny_npz)
        batches = du.sprite_batches(images, labels, batch_size=8, generator=seeded(), device=kind)
        assert plan_steps(1e6, model=model, batches=batches, schedule=SCHEDULE.to(kind), max_steps=3, probe_steps=5,
                          warmup=1, generator=seeded())[0] == 3
        ema, losses = du.train(model, batches, SCHEDULE.to(kind), steps=3, warmup=1, progress=False,
                               generator=seeded(), snr_gamma=5.0)
        assert len(losses) == 3 and next(ema.model.parameters()).device.type == kind
        cfg = TrainConfig(steps=3, n_feat=16, batch_size=8, warmup=1, checkpoint_every=3, t_sampling="lognormal",
                          input_perturbation=0.1)
        history = run_training(cfg, tmp_path / "run", data_path=tiny_npz, device=kind, progress=False)
        assert len(history) == 3 and all(np.isfinite(history))
        back = du.load_model(tmp_path / "run" / "ema.pt", kind)
        assert next(back.parameters()).device.type == kind
        run_training(cfg, tmp_path / "split", data_path=tiny_npz, device=kind, progress=False, stop_at=2)
        resumed = run_training(cfg, tmp_path / "split", data_path=tiny_npz, device=kind, progress=False, resume=True)
        assert resumed == history  # a run resumed on the GPU ends where an uninterrupted one does


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_features_on_a_gpu(kind):
    torch.manual_seed(0)
    clf = SpriteClassifier().eval()
    want = classifier_outputs(clf, X0)
    with StandinDevice(kind):
        got = classifier_outputs(clf.to(kind), X0.to(kind))
    assert np.allclose(got[0], want[0], atol=1e-6) and (got[1] == want[1]).all()


def test_the_standin_catches_what_a_gpu_refuses():
    with StandinDevice("cuda"):
        x = torch.ones(2, 3).to("cuda")
        with pytest.raises(DeviceMismatch):
            x * torch.ones(2, 3)  # notebook 7's mask built on the CPU, times a sprite on the GPU
        with pytest.raises(DeviceMismatch):
            torch.cat([x, torch.ones(2, 3)])  # notebook 6's x.cpu() beside a GPU sample
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        x * torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar: allowed, as on CUDA
    with StandinDevice("mps"):
        with pytest.raises(TypeError, match="float64"):
            torch.ones(3).to("mps").double()  # slerp's and the DPM-Solver's old float64


def test_bf16_only_where_it_is_native(monkeypatch):
    with StandinDevice("cuda"):  # answers like a T4: capability 7.5, is_bf16_supported() True (emulated)
        assert torch.cuda.is_bf16_supported() and fast_settings("cuda")[0] is None
    with StandinDevice("cuda", capability=(8, 0)):  # an A100
        assert fast_settings("cuda")[0] is torch.bfloat16
    with StandinDevice("mps"):
        assert fast_settings("mps")[0] is None
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    assert fast_settings("cpu") == (None, torch.contiguous_format)
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    assert fast_settings("cpu")[0] is torch.bfloat16
