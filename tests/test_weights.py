"""Devices, safe weight loading, the manifest check, and the shipped weights."""
import json

import pytest
import torch

import diffusion_utilities as du


def _tiny_weights(tmp_path):
    torch.manual_seed(0)
    model = du.ContextUnet(n_feat=8)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    du.add_to_manifest("tiny", "tiny.pt", weights_dir=tmp_path, args={"n_feat": 8}, seed=0)
    return model


def test_device_helper():
    assert du.get_device().type in ("cuda", "mps", "cpu")


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
        du.load_state(tmp_path / "evil.pt")


def test_shipped_weights_load_on_cpu():
    manifest = du.read_manifest()
    assert "sprites" in manifest and "classifier" in manifest
    for entry in manifest.values():  # every file says how it was made
        assert {"file", "sha256", "kind", "command", "seed", "hardware", "metrics"} <= set(entry)
    assert manifest["sprites"]["train_minutes"] > 0 and manifest["sprites"]["metrics"]["n"] >= 1000
    for name in manifest:
        model = du.load_pretrained(name, device="cpu")
        assert not model.training
    with torch.no_grad():
        out = du.load_pretrained("sprites", device="cpu")(torch.zeros(2, 3, 16, 16), torch.tensor([0.5, 0.5]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_cli_sample_writes_png(tmp_path):
    torch.manual_seed(0)
    torch.save(du.ContextUnet().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "grid.png"
    du.main(["sample", "--weights", str(tmp_path / "w.pt"), "--out", str(out), "--steps", "2", "--per-class", "2",
             "--classes", "hero", "food", "--gif", str(tmp_path / "g.gif"), "--device", "cpu"])
    from PIL import Image
    img = Image.open(out)
    assert img.size == ((2 * 17 + 1) * 4, (2 * 17 + 1) * 4)
    assert Image.open(tmp_path / "g.gif").n_frames == 3
    with pytest.raises(SystemExit, match="unknown class"):
        du.main(["sample", "--weights", str(tmp_path / "w.pt"), "--classes", "dragon"])
