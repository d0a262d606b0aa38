"""Devices, safe weight loading, the manifest check, and the shipped weights."""

import pytest
import torch

import course_tools.cli as cli
import course_tools.manifest as cman
import diffusion_utilities as du
from course_tools.metrics import load_classifier
from course_tools.training import TrainConfig, run_training


def _tiny_weights(tmp_path):
    torch.manual_seed(0)
    model = du.ContextUnet(n_feat=8)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    cman.add_to_manifest("tiny", "tiny.pt", weights_dir=tmp_path, args={"n_feat": 8}, seed=0)
    return model


def test_device_helper_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert du.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert du.get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert du.get_device() == torch.device("cuda")


def test_export_run_then_load_and_record_metrics(tiny_npz, tmp_path):
    data = tiny_npz
    cfg = TrainConfig(steps=3, batch_size=4, n_feat=8, warmup=1, snapshot_steps=[2])
    run_training(cfg, tmp_path / "run", data_path=data, progress=False, device="cpu")
    wdir = tmp_path / "w"
    cli.main(["export", "--run", str(tmp_path / "run"), "--weights-dir", str(wdir), "--name", "tiny"])
    manifest = cman.read_manifest(wdir)
    assert set(manifest) == {"tiny", "tiny_step000002"}
    assert manifest["tiny"]["step"] == 3 and manifest["tiny"]["train_minutes"] >= 0
    assert manifest["tiny"]["args"] == {"in_channels": 3, "n_feat": 8, "n_cfeat": 5, "height": 16, "norm": "batch",
                                        "prediction": "v"}  # the whole architecture: other data sets differ
    assert manifest["tiny"]["class_names"] == du.load_sprites(tiny_npz)[2]
    assert "train --steps 3 --seed 0" in manifest["tiny"]["command"]
    ema, _, _ = du.read_weights(tmp_path / "run" / "ema.pt")
    loaded = du.load_pretrained("tiny", "cpu", weights_dir=wdir).state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert du.load_pretrained("tiny_step000002", "cpu", weights_dir=wdir).height == 16
    res = {"n": 10, "floor": {"fid": 0.5}, "guide_steps": 25, "guidance": [], "snapshots": {
        "tiny_step000002": {"fid": 9.0, "kid": 0.1, "accuracy": 0.2}},
        "samplers": [{"sampler": "ddpm", "steps": 500, "eta": 1.0, "fid": 1.0, "kid": 0.01, "accuracy": 0.9}]}
    cli.record_metrics(res, "tiny", wdir)
    manifest = cman.read_manifest(wdir)
    assert manifest["tiny"]["metrics"]["fid_ddpm500"] == 1.0
    assert manifest["tiny_step000002"]["metrics"]["fid_ddim25"] == 9.0
    du.load_pretrained("tiny", "cpu", weights_dir=wdir)  # the sha256 still matches after the update


def test_export_averages_parameters_with_snapshots(tiny_npz, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=4, n_feat=8, warmup=1, snapshot_steps=[2])
    run_training(cfg, tmp_path / "run", data_path=tiny_npz, progress=False, device="cpu")
    wdir = tmp_path / "w"
    with pytest.raises(SystemExit, match=r"no snapshot at step\(s\) \[3\] \(it has \[2\]\)"):
        cli.main(["export", "--run", str(tmp_path / "run"), "--weights-dir", str(wdir), "--average-snapshots", "3"])
    assert not wdir.exists()  # refused before writing anything
    cli.main(["export", "--run", str(tmp_path / "run"), "--weights-dir", str(wdir), "--name", "tiny",
              "--average-snapshots", "2"])
    final = torch.load(tmp_path / "run" / "ema.pt", weights_only=True)["state_dict"]
    snap = torch.load(tmp_path / "run" / "snap_000002.pt", weights_only=True)["state_dict"]
    shipped = du.read_weights(wdir / "tiny.pt")[0]
    # the file describes itself: load_model alone rebuilds the same network and schedule as load_pretrained
    alone, listed = du.load_model(wdir / "tiny.pt", "cpu"), du.load_pretrained("tiny", "cpu", weights_dir=wdir)
    assert alone.settings == listed.settings and alone.prediction == "v"
    assert alone.schedule_args == listed.schedule_args and alone.class_names == listed.class_names == du.load_sprites(tiny_npz)[2]
    params = {name for name, _ in du.ContextUnet(n_feat=8).named_parameters()}
    for k, v in final.items():
        if k in params:  # the plain mean of the two EMA copies
            assert torch.allclose(shipped[k], (v + snap[k].float()) / 2, atol=1e-6), k
        else:  # BatchNorm statistics stay the final ones
            assert torch.equal(shipped[k], v), k
    assert not torch.equal(shipped["out.3.weight"], final["out.3.weight"])
    assert cman.read_manifest(wdir)["tiny"]["averaged_with_snapshots"] == [2]


def test_export_ships_chosen_snapshots_and_keeps_unchanged_ones(tiny_npz, tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, n_feat=8, warmup=1, snapshot_steps=[1, 2])
    run_training(cfg, tmp_path / "run", data_path=tiny_npz, progress=False, device="cpu")
    wdir, run = tmp_path / "w", str(tmp_path / "run")
    with pytest.raises(SystemExit, match=r"no snapshot at step\(s\) \[5\] to ship \(it has \[1, 2\]\)"):
        cli.main(["export", "--run", run, "--weights-dir", str(wdir), "--snapshots", "2", "5"])
    assert not wdir.exists()  # refused before writing anything
    cli.main(["export", "--run", run, "--weights-dir", str(wdir), "--name", "tiny", "--snapshots", "2"])
    assert set(cman.read_manifest(wdir)) == {"tiny", "tiny_step000002"} and not (wdir / "tiny_step000001.pt").exists()
    # The same weights with other metadata (as a rerun of the same training writes): the file stays byte for byte.
    snap = wdir / "tiny_step000002.pt"
    data = torch.load(snap, weights_only=True)
    torch.save({**data, "train_seconds": 12345.0}, snap)
    before = snap.read_bytes()
    cli.main(["export", "--run", run, "--weights-dir", str(wdir), "--name", "tiny", "--snapshots", "2"])
    assert snap.read_bytes() == before
    assert cman.read_manifest(wdir)["tiny_step000002"]["sha256"] == cman.sha256_file(snap)
    # Other weights are replaced.
    changed = {k: (v + 1 if v.is_floating_point() else v) for k, v in data["state_dict"].items()}
    torch.save({**data, "state_dict": changed}, snap)
    cli.main(["export", "--run", run, "--weights-dir", str(wdir), "--name", "tiny"])
    assert torch.equal(torch.load(snap, weights_only=True)["state_dict"]["out.3.weight"],
                       data["state_dict"]["out.3.weight"])
    assert set(cman.read_manifest(wdir)) == {"tiny", "tiny_step000001", "tiny_step000002"}  # default: all of them
    du.load_pretrained("tiny_step000002", "cpu", weights_dir=wdir)  # the sha256 matches


def test_load_pretrained_verifies_sha256(tmp_path):
    model = _tiny_weights(tmp_path)
    loaded = du.load_pretrained("tiny", device="cpu", weights_dir=tmp_path)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    raw = bytearray((tmp_path / "tiny.pt").read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte
    (tmp_path / "tiny.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its manifest"):
        du.load_pretrained("tiny", device="cpu", weights_dir=tmp_path)


def test_load_errors(tmp_path):
    _tiny_weights(tmp_path)
    with pytest.raises(ValueError, match="unknown pretrained model 'nope'.*tiny"):
        du.load_pretrained("nope", weights_dir=tmp_path)
    (tmp_path / "tiny.pt").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        du.load_pretrained("tiny", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights manifest"):
        du.load_pretrained(weights_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        du.load_model(tmp_path / "gone.pt")


def test_weights_only_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this should never run",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        du.read_weights(tmp_path / "evil.pt")


def test_shipped_weights_load_on_cpu():
    manifest = cman.read_manifest()
    assert "sprites" in manifest and "classifier" in manifest
    for entry in manifest.values():  # every file says how it was made
        assert {"file", "sha256", "kind", "command", "seed", "hardware", "metrics"} <= set(entry)
    assert manifest["sprites"]["train_minutes"] > 0 and manifest["sprites"]["metrics"]["n"] >= 1000
    for name, entry in manifest.items():
        load = load_classifier if entry["kind"] == "classifier" else du.load_pretrained
        assert not (load(device="cpu") if load is load_classifier else load(name, device="cpu")).training
    with pytest.raises(ValueError, match="course_tools.metrics.load_classifier"):
        du.load_pretrained("classifier")
    with torch.no_grad():
        out = du.load_pretrained("sprites", device="cpu")(torch.zeros(2, 3, 16, 16), torch.tensor([0.5, 0.5]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_cli_sample_writes_png(tmp_path):
    torch.manual_seed(0)
    torch.save(du.ContextUnet().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "grid.png"
    cli.main(["sample", "--weights", str(tmp_path / "w.pt"), "--out", str(out), "--steps", "2", "--per-class", "2",
             "--classes", "hero", "food", "--gif", str(tmp_path / "g.gif"), "--device", "cpu"])
    from PIL import Image
    img = Image.open(out)
    assert img.size == ((2 * 17 + 1) * 4, (2 * 17 + 1) * 4)
    assert Image.open(tmp_path / "g.gif").n_frames == 3
    with pytest.raises(SystemExit, match="unknown class"):
        cli.main(["sample", "--weights", str(tmp_path / "w.pt"), "--classes", "dragon"])
