"""The training objective, a short real training run, resuming, and atomic checkpoints."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import course_tools.cli as cli
import diffusion_utilities as du
from course_tools.runs import save_atomic
from course_tools.training import TrainConfig, plan_steps, run_training


def test_loss_is_noise_mse(schedule):
    # A network that predicts zero noise scores E[noise^2] = 1.
    class Zero(du.ContextUnet):
        def forward(self, x, t, c=None):
            return torch.zeros_like(x)

    x = torch.rand(64, 3, 16, 16) * 2 - 1
    loss = du.diffusion_loss(Zero(n_feat=8), x, du.one_hot(torch.zeros(64, dtype=torch.long)), schedule,
                             generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="drop_prob"):
        du.diffusion_loss(Zero(n_feat=8), x, None, schedule, drop_prob=1.5)


def test_context_dropout_rate(schedule):
    seen = []

    class Spy(du.ContextUnet):
        def forward(self, x, t, c=None):
            seen.append(c.clone())
            return torch.zeros_like(x)

    c = du.one_hot(torch.randint(0, 5, (4000,)))
    du.diffusion_loss(Spy(n_feat=8), torch.zeros(4000, 3, 16, 16), c, schedule, drop_prob=0.1,
                      generator=torch.Generator().manual_seed(0))
    dropped = (seen[0].sum(1) == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.015)
    assert torch.equal(seen[0][seen[0].sum(1) > 0], c[seen[0].sum(1) > 0])


def test_training_reduces_loss(schedule):
    torch.manual_seed(0)
    images, labels, _ = du.load_sprites()
    x = du.to_tensor_images(images[:32])
    c = du.one_hot(torch.from_numpy(labels[:32]))
    model = du.ContextUnet(n_feat=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = [du.train_step(model, opt, x, c, schedule, generator=g) for _ in range(40)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_lr_schedule():
    assert du.lr_at(0, 1000, 1e-3, 1e-5, warmup=100) == pytest.approx(1e-5)
    assert du.lr_at(100, 1000, 1e-3, 1e-5, warmup=100) == pytest.approx(1e-3)
    assert du.lr_at(1000, 1000, 1e-3, 1e-5, warmup=100) == pytest.approx(1e-5)
    assert du.lr_at(550, 1000, 1e-3, 1e-5, warmup=100) == pytest.approx((1e-3 + 1e-5) / 2)


def test_ema_tracks_weights():
    m = torch.nn.Linear(2, 2)
    ema = du.EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    before = ema.model.weight.clone()
    ema.update(m)  # ramp: d = min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.model.weight, d * before + (1 - d) * 1.0)


def test_resume_reaches_the_same_state(tiny_npz, tmp_path):
    data = tiny_npz
    cfg = TrainConfig(steps=6, batch_size=8, n_feat=8, warmup=2, checkpoint_every=100, snapshot_steps=[2])
    whole = run_training(cfg, tmp_path / "whole", data_path=data, progress=False, device="cpu")
    run_training(cfg, tmp_path / "split", data_path=data, progress=False, device="cpu", stop_at=3)
    assert (tmp_path / "split" / "checkpoint.pt").exists() and not (tmp_path / "split" / "ema.pt").exists()
    split = run_training(cfg, tmp_path / "split", data_path=data, progress=False, device="cpu", resume=True)
    assert whole == split and len(whole) == 6
    a, args_a, _ = du.read_weights(tmp_path / "whole" / "ema.pt")
    b, args_b, _ = du.read_weights(tmp_path / "split" / "ema.pt")
    assert args_a == args_b and args_a["n_feat"] == cfg.n_feat
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "snap_000002.pt").exists()
    assert json.loads((tmp_path / "whole" / "history.json").read_text())["loss"] == whole
    # a checkpoint loads as a model (its EMA weights)
    assert isinstance(du.load_model(tmp_path / "split" / "checkpoint.pt", "cpu", n_feat=8), du.ContextUnet)


def test_resume_refuses_other_config_or_missing_checkpoint(tiny_npz, tmp_path):
    data = tiny_npz
    cfg = TrainConfig(steps=2, batch_size=4, n_feat=8, warmup=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_training(cfg, tmp_path / "r", data_path=data, progress=False, device="cpu", resume=True)
    run_training(cfg, tmp_path / "r", data_path=data, progress=False, device="cpu")
    with pytest.raises(ValueError, match="other settings: batch_size=4 in the checkpoint, now 5"):
        run_training(TrainConfig(steps=2, batch_size=5, n_feat=8, warmup=1), tmp_path / "r", data_path=data,
                 progress=False, device="cpu", resume=True)
    # a different length is allowed: train longer
    longer = run_training(TrainConfig(steps=3, batch_size=4, n_feat=8, warmup=1), tmp_path / "r", data_path=data,
                      progress=False, device="cpu", resume=True)
    assert len(longer) == 3


def test_save_atomic_never_leaves_a_broken_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_atomic({"a": torch.ones(3)}, path)
    real_write = Path.write_bytes

    def crash(self, data):
        real_write(self, data[:10])  # half-written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.zeros(3)}, path)
    monkeypatch.setattr(Path, "write_bytes", real_write)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))


def test_cli_train_then_resume(tiny_npz, tmp_path):
    data = str(tiny_npz)
    out = str(tmp_path / "cli")
    common = ["train", "--out", out, "--steps", "4", "--batch-size", "4", "--n-feat", "8", "--data", data,
              "--device", "cpu", "--checkpoint-every", "2"]
    cli.main(common + ["--minutes", "0"])  # stops after the first step, with a checkpoint
    ck = torch.load(tmp_path / "cli" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 1
    cli.main(common + ["--resume"])
    assert torch.load(tmp_path / "cli" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert (tmp_path / "cli" / "ema.pt").exists()


def test_the_schedule_travels_with_the_model(tiny_npz, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, n_feat=8, warmup=1, terminal_signal=0.004, snapshot_steps=[1])
    run_training(cfg, tmp_path / "r", data_path=tiny_npz, progress=False, device="cpu")
    want = du.make_schedule(500, terminal_signal=0.004)
    for name in ("ema.pt", "snap_000001.pt", "checkpoint.pt"):
        model = du.load_model(tmp_path / "r" / name, "cpu")
        assert model.schedule_args == {"timesteps": 500, "terminal_signal": 0.004}
        assert model.class_names == du.load_sprites(tiny_npz)[2]  # read from the file, for sample --classes
        assert torch.equal(du.model_schedule(model).ab_t, want.ab_t)
    assert torch.equal(du.model_schedule(du.ContextUnet(n_feat=8)).ab_t, du.make_schedule(500).ab_t)
    with pytest.raises(ValueError, match="--terminal-signal"):
        TrainConfig(terminal_signal=0.5)


def plan(seconds, **options):
    torch.manual_seed(0)
    model, (images, labels, _) = du.ContextUnet(n_feat=8), du.load_sprites()
    batches = du.sprite_batches(images, labels, batch_size=8, generator=torch.Generator().manual_seed(0))
    return plan_steps(seconds, model=model, batches=batches, schedule=du.make_schedule(500), probe_steps=6,
                      warmup=5, **options)


def test_plan_steps_fits_the_wait():
    steps, per_step = plan(1e6, max_steps=400)
    assert steps == 400 and 0 < per_step < 5  # everything fits: the run's own length
    steps, _ = plan(20 * per_step, max_steps=400)
    assert 5 <= steps <= 80  # about 20 steps fit (the machine's pace varies between the two probes)
    assert plan(1e-6, max_steps=400, min_steps=30)[0] == 30


@pytest.mark.parametrize("seconds", [0, -5, float("nan"), "90"])
def test_plan_steps_refuses_a_wait_that_is_not_positive(seconds):
    with pytest.raises((ValueError, TypeError), match="seconds must be a positive number"):
        plan(seconds, max_steps=10)
