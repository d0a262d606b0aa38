"""The command line never damages what ships: weights/ only with --to-weights, no unfinished exports,
one training per run folder."""
import os
import subprocess
import sys

import pytest
import torch

import course_tools.cli as cli
import course_tools.manifest as cman
import diffusion_utilities as du
from course_tools.runs import save_atomic
from course_tools.training import TrainConfig, run_training


def _shipped_state():
    return {p.name: p.stat().st_mtime_ns for p in du.WEIGHTS_DIR.iterdir()}


@pytest.fixture
def finished_run(tiny_npz, tmp_path):
    data = tiny_npz
    cfg = TrainConfig(steps=3, batch_size=4, n_feat=8, warmup=1)
    run_training(cfg, tmp_path / "run", data_path=data, progress=False, device="cpu")
    return tmp_path / "run", data


def test_export_and_evaluate_refuse_weights_without_the_flag(finished_run, tmp_path):
    run, _ = finished_run
    before = _shipped_state()
    for argv in (["export", "--run", str(run), "--weights-dir", str(du.WEIGHTS_DIR)],
                 ["export", "--run", str(run), "--weights-dir", str(du.WEIGHTS_DIR / "sub")],
                 ["evaluate", "--out", str(du.WEIGHTS_DIR), "--n", "4"]):
        with pytest.raises(SystemExit, match="--to-weights"):
            cli.main(argv)
    assert _shipped_state() == before


def test_export_default_goes_to_outputs(finished_run, tmp_path, monkeypatch):
    run, _ = finished_run
    monkeypatch.chdir(tmp_path)
    before = _shipped_state()
    cli.main(["export", "--run", str(run), "--name", "tiny"])
    assert (tmp_path / "outputs" / "export" / "tiny.pt").exists()
    assert "tiny" in cman.read_manifest(tmp_path / "outputs" / "export")
    assert _shipped_state() == before


def test_export_refuses_an_unfinished_run(tiny_npz, tmp_path):
    data = tiny_npz
    cfg = TrainConfig(steps=6, batch_size=4, n_feat=8, warmup=1)
    run_training(cfg, tmp_path / "run", data_path=data, progress=False, device="cpu", stop_at=2)
    with pytest.raises(SystemExit, match="stopped at step 2 of 6"):
        cli.main(["export", "--run", str(tmp_path / "run"), "--weights-dir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


@pytest.mark.slow  # starts a second process
def test_second_training_on_one_folder_fails_at_once(tiny_npz, tmp_path):
    data = tiny_npz
    # another live process holds the folder
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "LOCK").write_text(str(holder.pid))
        cfg = TrainConfig(steps=2, batch_size=4, n_feat=8, warmup=1)
        with pytest.raises(RuntimeError, match=f"in use by training process {holder.pid}"):
            run_training(cfg, tmp_path / "run", data_path=data, progress=False, device="cpu")
        assert not (tmp_path / "run" / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    # once that process is gone, its lock is stale and taken over; the run then releases it
    run_training(cfg, tmp_path / "run", data_path=data, progress=False, device="cpu")
    assert (tmp_path / "run" / "ema.pt").exists() and not (tmp_path / "run" / "LOCK").exists()


def test_checkpoint_temp_files_are_per_process(tmp_path, monkeypatch):
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moves.append((str(src), str(dst))), real_replace(src, dst)))
    save_atomic({"a": torch.ones(1)}, tmp_path / "ck.pt")
    assert moves == [(str(tmp_path / f"ck.pt.{os.getpid()}.tmp"), str(tmp_path / "ck.pt"))]


def test_saved_bytes_depend_on_the_weights_alone(tmp_path):
    weights = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    save_atomic(weights, tmp_path / "a.pt")
    save_atomic(dict(weights), tmp_path / "other_name.pt")  # same weights, another file name
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other_name.pt").read_bytes()
    save_atomic({**weights, "w": weights["w"] + 1}, tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() != (tmp_path / "a.pt").read_bytes()
