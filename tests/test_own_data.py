"""Your own images: make-dataset, then train and sample on them (32x32, 3 classes), and its bad inputs."""
import numpy as np
import pytest
from PIL import Image

import diffusion_utilities as du
from course_tools.cli import main
from course_tools.dataset import load_image, make_dataset, resize_filter


def write_image(path, rgba, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(rgba, np.uint8), "RGBA")
    if fmt == "JPEG":
        img = img.convert("RGB")
    img.save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """3 classes of small generated images in PNG, JPEG and WebP, with a duplicate, a truncated file and a
    text file mixed in."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, name in enumerate(["cats", "dogs", "frogs"]):
        for i in range(6):
            rgba = np.zeros((8, 12, 4), np.uint8)  # not square: padded
            rgba[..., c] = rng.integers(100, 256, (8, 12))
            rgba[2:6, 3:9, 3] = 255  # an opaque block on a transparent background
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
            write_image(root / name / f"{i}.{ext}", rgba, fmt)
    (root / "cats" / "copy.png").write_bytes((root / "cats" / "0.png").read_bytes())
    (root / "dogs" / "broken.png").write_bytes((root / "dogs" / "0.png").read_bytes()[:60])
    (root / "frogs" / "notes.txt").write_text("not an image")
    return root


def test_folder_to_samples_in_three_commands(image_folder, tmp_path, capsys):
    data = tmp_path / "mine.npz"
    main(["make-dataset", str(image_folder), "--size", "32", "--out", str(data)])
    printed = capsys.readouterr().out
    assert "dropped 1 exact duplicate" in printed and "dogs/broken.png" in printed
    with np.load(data) as d:
        assert d["images"].shape == (18, 32, 32, 3) and d["alpha"].shape == (18, 32, 32)
        assert list(d["class_names"]) == ["cats", "dogs", "frogs"]
        assert np.bincount(d["labels"]).tolist() == [6, 6, 6]
        assert "frogs/2.webp" in list(d["sources"])
    assert (tmp_path / "mine_sheet.png").exists()

    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="holds only 18 images"):
        main(["train", "--data", str(data), "--out", str(run), "--steps", "2", "--batch-size", "4", "--n-feat", "8",
              "--warmup", "1", "--device", "cpu"])
    model = du.load_model(run / "ema.pt", "cpu")
    assert (model.n_cfeat, model.height) == (3, 32)
    out = tmp_path / "samples.png"
    main(["sample", "--weights", str(run / "ema.pt"), "--out", str(out), "--per-class", "2", "--steps", "2",
          "--classes", "dogs", "0", "--device", "cpu"])
    assert Image.open(out).size[1] > 2 * 32  # two rows of 32-pixel samples
    with pytest.raises(SystemExit, match="unknown class 'hero'; choose from cats, dogs, frogs"):
        main(["sample", "--weights", str(run / "ema.pt"), "--out", str(out), "--classes", "hero", "--device", "cpu"])


def test_images_are_composited_over_white_and_pixel_art_stays_crisp(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (255, 0, 0, 128)  # half-transparent red over white is pink
    rgb, alpha = load_image(write_image(tmp_path / "a.png", rgba), 16)
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[-1, -1].tolist() == [255, 255, 255]
    assert rgb[0, 5].tolist() == [255, 127, 127] and alpha[0, 5] == 128
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) == 3  # enlarged with NEAREST: no blended colours
    assert resize_filter(4, 16) == Image.Resampling.NEAREST
    assert resize_filter(64, 16) == Image.Resampling.BOX
    assert resize_filter(20, 16) == Image.Resampling.LANCZOS


def test_make_dataset_refuses_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        make_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        make_dataset(tmp_path / "empty")
    write_image(tmp_path / "one" / "a" / "x.png", np.full((4, 4, 4), 255))
    (tmp_path / "one" / "b").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*b holds no images"):
        make_dataset(tmp_path / "one")
    write_image(tmp_path / "single" / "a" / "x.png", np.full((4, 4, 4), 255))
    with pytest.raises(ValueError, match="1 usable image"):
        make_dataset(tmp_path / "single")
    for size in (10, 0, 2):
        with pytest.raises(ValueError, match="multiple of 4"):
            make_dataset(tmp_path / "single", size=size)


def test_make_dataset_command_protects_the_course_data(image_folder, tmp_path):
    with pytest.raises(SystemExit, match="course's sprite set"):
        main(["make-dataset", str(image_folder), "--out", str(du.DATA_FILE)])
    with pytest.raises(SystemExit, match=r"must end in \.npz"):
        main(["make-dataset", str(image_folder), "--out", str(tmp_path / "mine.zip")])
    with pytest.raises(SystemExit, match="multiple of 4"):
        main(["make-dataset", str(image_folder), "--size", "30", "--out", str(tmp_path / "m.npz")])
