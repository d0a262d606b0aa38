"""Data-parallel training under torchrun: a 2-process gloo job on the CPU against the same global batch in
one process, and resuming under torchrun."""
import os
import subprocess
import sys

import pytest
import torch

import diffusion_utilities as du
from course_tools.hardware import use_fast_settings
from course_tools.training import TrainConfig, TrainingData

pytestmark = pytest.mark.slow  # torchrun jobs: the full suite runs them, the fast loop does not

ROOT = du.ROOT
ARGS = ["--steps", "3", "--batch-size", "8", "--n-feat", "8", "--norm", "group", "--warmup", "1",
        "--checkpoint-every", "1", "--device", "cpu", "--threads", "1", "--seed", "3"]


def torchrun(nproc, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "diffusion_utilities.py"), "train", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def reference_run(data_path, steps, world=2):
    """What 2 processes compute, in one: each part of the global batch drawn with its own generator
    (seed + rank), the loss averaged over the parts, one optimiser step. With GroupNorm every image is
    normalised on its own, so this is the loss of the whole global batch."""
    config = TrainConfig(steps=3, batch_size=8, n_feat=8, norm="group", warmup=1, seed=3)
    device = torch.device("cpu")
    data = TrainingData(data_path)
    torch.manual_seed(config.seed)
    model = du.ContextUnet(n_feat=8, n_cfeat=data.n_classes, height=data.height, norm="group",
                           prediction=config.prediction)
    mem_format = use_fast_settings(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    gens = [torch.Generator().manual_seed(config.seed + r) for r in range(world)]
    parts = [data.batches(config, config.batch_size // world, gens[r], device, mem_format) for r in range(world)]
    schedule = du.make_schedule(config.timesteps)
    history = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = du.lr_at(step, config.steps, config.lr, config.lr_min, config.warmup)
        opt.zero_grad()
        losses = []
        for r in range(world):
            x, c = next(parts[r])
            loss = du.diffusion_loss(model, x, c, schedule, drop_prob=config.drop_prob, generator=gens[r],
                                     snr_gamma=config.snr_gamma)
            (loss / world).backward()
            losses.append(loss.item())
        opt.step()
        history.append(sum(losses) / world)
    return model, history


@pytest.fixture(scope="module")
def whole_run(tiny_npz_module, tmp_path_factory):
    """3 steps in 2 gloo processes: the run both tests read (one torchrun job fewer in CI)."""
    out = tmp_path_factory.mktemp("ddp") / "whole"
    torchrun(2, "--data", str(tiny_npz_module), "--out", str(out), *ARGS)
    return out


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tiny_npz_module, whole_run):
    ck = torch.load(whole_run / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["generators"]) == 2 and ck["step"] == 3
    model, history = reference_run(tiny_npz_module, 3)
    # Tolerance: the two runs add the same numbers in a different order (gloo's all-reduce against
    # autograd), so weights agree to float32 rounding, well below one Adam step (lr 1e-3).
    assert torch.allclose(torch.tensor(ck["history"]), torch.tensor(history), rtol=1e-4, atol=1e-5)
    for name, value in model.state_dict().items():
        assert torch.allclose(ck["model"][name], value, atol=1e-5), name
    assert (whole_run / "ema.pt").exists() and not list(whole_run.glob("LOCK"))


def test_resume_under_torchrun_continues_the_same_run(tiny_npz_module, whole_run, tmp_path):
    split = tmp_path / "split"
    # 2 steps, then a resumed third: the same weights as 3 steps in one go
    args = [a if a != "3" or i != 1 else "2" for i, a in enumerate(ARGS)]
    torchrun(2, "--data", str(tiny_npz_module), "--out", str(split), *args)
    torchrun(2, "--data", str(tiny_npz_module), "--out", str(split), "--resume", *ARGS)
    a = torch.load(whole_run / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert b["step"] == 3 and a["history"][:2] == b["history"][:2]
    # with warm-up 1, steps 0 and 1 get the same learning rate whether 2 or 3 steps are planned, so the
    # split run must end exactly where the whole run ends (generators, optimiser and weights restored)
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], atol=1e-6), name
