"""Bad input gets a clear error that names the argument, never a silently wrong result."""
import json
import math

import numpy as np
import pytest
import torch

import course_tools.cli as cli
import course_tools.manifest as cman
import diffusion_utilities as du
from course_tools.training import TrainConfig, run_training


def test_uint8_images_are_refused_not_misread(schedule, tiny_model):
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="x must hold floats in \\[-1, 1\\].*to_tensor_images"):
        du.perturb_input(pixels, 10, torch.randn(2, 3, 16, 16), schedule)
    with pytest.raises(ValueError, match="x must hold floats"):
        tiny_model(pixels, torch.rand(2))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_are_refused(schedule, tiny_model, bad):
    x = torch.zeros(2, 3, 16, 16)
    x[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        du.perturb_input(x, 10, torch.zeros_like(x), schedule)
    with pytest.raises(ValueError, match="context holds NaN or inf"):
        du.sample_ddim(tiny_model, 2, schedule, n_steps=2, context=torch.full((2, 5), bad))
    with pytest.raises(ValueError, match="eta must be a finite number"):
        du.sample_ddim(tiny_model, 2, schedule, n_steps=2, eta=bad)
    with pytest.raises(ValueError, match="guide_w must be a finite number"):
        du.sample_ddim(tiny_model, 2, schedule, n_steps=2, context=torch.tensor([0, 1]), guide_w=bad)


def test_predict_noise_checks_t(schedule, tiny_model):
    x = torch.zeros(2, 3, 16, 16)
    for t in (-1, 501, 2.5):
        with pytest.raises(ValueError, match="t must be an integer step in 0..500"):
            du.predict_noise(tiny_model, x, t, schedule)


def test_z_must_be_one_noise_per_sample(schedule):
    x = torch.zeros(4, 3, 16, 16)
    with pytest.raises(ValueError, match="z must have the shape of x"):
        du.denoise_add_noise(x, 10, x, schedule, z=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="z must have the shape of x"):
        du.denoise_ddim(x, 10, 5, x, schedule, eta=1.0, z=torch.zeros(1, 3, 16, 16))


def test_float_class_ids_are_not_read_as_a_blend(schedule, tiny_model):
    # five float "ids" for five classes used to be read as one blended context
    with pytest.raises(ValueError, match="1-D context must hold integer class ids"):
        du.sample_ddim(tiny_model, 5, schedule, n_steps=2, context=[0.0, 1.0, 2.0, 3.0, 4.0])
    # one blended context for every sample is said explicitly, as (1, n_cfeat)
    out, _ = du.sample_ddim(tiny_model, 3, schedule, n_steps=2, context=torch.tensor([[0.5, 0.5, 0, 0, 0]]))
    assert out.shape == (3, 3, 16, 16)


def test_any_network_with_the_call_signature_samples(schedule):
    class MyNet(torch.nn.Module):  # a learner's own network, not a ContextUnet
        in_channels, height, n_cfeat = 3, 8, 5

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, t, c=None):
            return self.conv(x) * t.view(-1, 1, 1, 1)

    out, frames = du.sample_ddim(MyNet(), 2, schedule, n_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and frames.shape == (4, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="lacks \\['height', 'n_cfeat'\\]"):
        du.sample_ddim(torch.nn.Conv2d(3, 3, 1), 2, schedule)


def test_sampler_options_are_keyword_only(schedule, tiny_model):
    with pytest.raises(TypeError):
        du.sample_ddim(tiny_model, 2, schedule, 5)
    with pytest.raises(TypeError):
        du.denoise_ddim(torch.zeros(1, 3, 4, 4), 10, 5, torch.zeros(1, 3, 4, 4), schedule, 0.5)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_bad_dataset_files(tmp_path):
    good = dict(np.load(du.DATA_FILE))
    (tmp_path / "empty.npz").write_bytes(b"")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(du.DATA_FILE.read_bytes()[:5000])
    cases = {
        tmp_path / "empty.npz": "cannot be read",
        truncated: "cannot be read",
        _write_npz(tmp_path / "keys.npz", images=good["images"]): "lacks \\['class_names', 'labels'\\]",
        _write_npz(tmp_path / "float.npz", **{**good, "images": good["images"] / 255.0}): "uint8 pixels",
        _write_npz(tmp_path / "shape.npz", **{**good, "images": good["images"][:, :8]}): "shape \\(N, H, H, 3\\)",
        _write_npz(tmp_path / "count.npz", **{**good, "labels": good["labels"][:-1]}): "one label",
        _write_npz(tmp_path / "ids.npz", **{**good, "labels": good["labels"] + 3}): "labels must be integers in 0..4",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            du.load_sprites(path)


@pytest.mark.parametrize("option, value, message", [
    ("steps", 0, "--steps must be a positive integer"),
    ("steps", -5, "--steps must be a positive integer"),
    ("batch_size", 0, "--batch-size must be a positive integer"),
    ("checkpoint_every", 0, "--checkpoint-every must be a positive integer"),
    ("ema_decay", 1.0, "--ema-decay must lie in \\[0, 1\\)"),
    ("ema_decay", -0.5, "--ema-decay must lie in \\[0, 1\\)"),
    ("lr", math.nan, "--lr must be a finite number"),
    ("drop_prob", math.inf, "--drop-prob must be a finite number"),
    ("n_feat", 20, "--n-feat must be a positive multiple of 8"),
    ("snr_gamma", math.nan, "--snr-gamma must be a finite number"),
])
def test_bad_training_options(option, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{option: value})


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_npz, tmp_path, monkeypatch):
    data = tiny_npz
    cfg = TrainConfig(steps=6, batch_size=4, n_feat=8, warmup=1, checkpoint_every=2)
    real_step = du.train_step
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        return math.nan if len(calls) == 4 else real_step(*args, **kwargs)

    monkeypatch.setattr(du, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="loss became nan at step 4.*checkpoint \\(2\\)"):
        run_training(cfg, tmp_path / "run", data_path=data, progress=False, device="cpu")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_resume_names_the_setting_that_differs(tiny_npz, tmp_path):
    data = tiny_npz
    cfg = TrainConfig(steps=2, batch_size=4, n_feat=8, warmup=1)
    run_training(cfg, tmp_path / "r", data_path=data, progress=False, device="cpu")
    with pytest.raises(ValueError, match="lr=0.001 in the checkpoint, now 0.002"):
        run_training(TrainConfig(steps=2, batch_size=4, n_feat=8, warmup=1, lr=2e-3), tmp_path / "r", data_path=data,
                 progress=False, device="cpu", resume=True)
    other = tmp_path / "other.npz"
    d = dict(np.load(data))
    np.savez(other, **{**d, "images": d["images"][::-1].copy()})
    with pytest.raises(ValueError, match="--data: the checkpoint trained on"):
        run_training(cfg, tmp_path / "r", data_path=other, progress=False, device="cpu", resume=True)


def test_load_model_on_a_file_that_is_not_weights(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a weights file"):
        du.load_model(tmp_path / "notes.pt", "cpu")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds no model weights"):
        du.load_model(tmp_path / "list.pt", "cpu")
    torch.save(du.ContextUnet(n_feat=16).state_dict(), tmp_path / "w16.pt")
    with pytest.raises(ValueError, match="does not fit ContextUnet.*n_feat"):
        du.load_model(tmp_path / "w16.pt", "cpu")


def test_bad_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid manifest"):
        cman.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"weights": {"x": {"file": "../../etc/passwd"}}}))
    with pytest.raises(ValueError, match="points outside"):
        du.load_pretrained("x", "cpu", weights_dir=tmp_path)


@pytest.mark.parametrize("bad", [(300, 100), (0, 501), (-1, 10), (1.5, 300), (True, 300), 300, (0, 100, 200)])
def test_bad_guidance_interval_is_refused_before_sampling(tiny_model, schedule, bad):
    with pytest.raises(ValueError, match="guide_interval must be two integer steps \\(low, high\\) with 0 <= low"):
        du.sample_ddim(tiny_model, 2, schedule, n_steps=2, context=torch.tensor([0, 1]), guide_w=2.0, guide_interval=bad)
    with pytest.raises(ValueError, match="guide_interval"):
        du.predict_noise(tiny_model, torch.zeros(2, 3, 16, 16), 10, schedule, du.one_hot(torch.tensor([0, 1])), 2.0,
                         guide_interval=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.7", True, None])
def test_bad_guidance_rescale_is_refused(tiny_model, schedule, bad):
    with pytest.raises(ValueError, match="guide_rescale must be a number in \\[0, 1\\]"):
        du.sample_ddim(tiny_model, 2, schedule, n_steps=2, context=torch.tensor([0, 1]), guide_w=2.0, guide_rescale=bad)


def test_sample_command_checks_its_arguments_first(tmp_path):
    for argv, message in [(["sample", "--out", str(tmp_path / "grid.txt")], "must end in an image format"),
                          (["sample", "--gif", str(tmp_path / "a.png")], "must end in .gif"),
                          (["sample", "--sampler", "ddpm", "--steps", "5"], "DDPM always takes all 500 steps"),
                          (["sample", "--out", str(tmp_path / "g.png"), "--guide-interval", "400", "0"],
                           "guide_interval must be two integer steps"),
                          (["evaluate", "--out", str(tmp_path / "ev"), "--guide-interval", "0", "900"],
                           "--guide-interval LOW HIGH needs 0 <= LOW <= HIGH <= 500"),
                          (["sample", "--out", str(tmp_path / "g.png"), "--guide-rescale", "1.5"],
                           "guide_rescale must be a number in"),
                          (["evaluate", "--out", str(tmp_path / "ev"), "--guide-rescale", "0"],
                           "--guide-rescale needs a number in \\(0, 1\\]")]:
        with pytest.raises(SystemExit, match=message):
            cli.main(argv)
    assert not list(tmp_path.iterdir())
