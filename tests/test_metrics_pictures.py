"""Sample-quality metrics, the evaluation on small n, and the picture helpers."""
import matplotlib

matplotlib.use("Agg")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.animation import FuncAnimation  # noqa: E402

import course_tools.metrics as cm  # noqa: E402
import diffusion_utilities as du  # noqa: E402
from course_tools.pictures import save_gif  # noqa: E402


def test_frechet_distance_closed_form():
    # For Gaussians N(m1, s1^2 I) and N(m2, s2^2 I) in D dims: D (m1 - m2)^2 + D (s1 - s2)^2.
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (200000, 3))
    b = rng.normal(0.5, 2.0, (200000, 3))
    assert cm.frechet_distance(a, b) == pytest.approx(3 * 0.25 + 3 * 1.0, rel=0.02)
    assert cm.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="same D"):
        cm.frechet_distance(a, b[:, :2])


def test_kid_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same, _ = cm.kernel_inception_distance(a, b, n_subsets=20, subset_size=300)
    shifted, _ = cm.kernel_inception_distance(a, b + 1.0, n_subsets=20, subset_size=300)
    assert abs(same) < 0.01 and shifted > 0.1


def test_nearest_neighbours_finds_copies_and_mirrors():
    images, _, _ = du.load_sprites()
    train = images[:50]
    x = du.to_tensor_images(train[[3, 7]])
    x[1] = x[1].flip(-1)
    idx, dist, flipped = cm.nearest_neighbours(x, train)
    assert idx.tolist() == [3, 7] and np.allclose(dist, 0, atol=1e-6) and flipped.tolist() == [False, True]


def test_split_is_stratified_and_disjoint():
    _, labels, _ = du.load_sprites()
    tr, te = cm.split_indices(labels, 0.15, seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(labels)
    for c in range(5):
        assert np.mean(labels[te] == c) == pytest.approx(np.mean(labels == c), abs=0.01)


def test_evaluate_small_n(tmp_path):
    torch.manual_seed(0)
    images, labels, names = du.load_sprites()
    model = du.ContextUnet(n_feat=8).eval()
    clf = cm.SpriteClassifier().eval()
    res, samples, idx, dist = cm.evaluate(model, clf, du.make_schedule(10), images, labels, np.arange(0, 2718, 50),
                                          class_names=names, n=12, ddim_steps=(2,), etas=(0.0,), guide_ws=(0, 1),
                                          per_class=2, guide_steps=2, progress=False, guide_interval=(0, 4), guide_rescale=0.5,
                                          snapshots={"early": du.ContextUnet(n_feat=8).eval()})
    assert [r["sampler"] for r in res["samplers"]] == ["ddpm", "ddim"]
    assert res["floor"]["fid"] >= 0 and all(np.isfinite(r["fid"]) for r in res["samplers"])
    # w = 0 and 1 at every step, then w = 1 with guidance only for t <= 4 (DDIM-2 visits 10 and 5: unguided),
    # then w = 1 rescaled
    assert [(g["guide_w"], g["guide_interval"], g["guide_rescale"]) for g in res["guidance"]] == [
        (0, None, 0.0), (1, None, 0.0), (1, [0, 4], 0.0), (1, None, 0.5)]
    assert list(res["guidance"][0]["class_accuracy"]) == names
    assert res["guidance"][2]["fid"] == pytest.approx(res["guidance"][0]["fid"])
    assert samples.shape == (12, 3, 16, 16) and idx.shape == dist.shape == (12,)
    md = cm.metrics_markdown(res, "python diffusion_utilities.py evaluate --n 12")
    assert "| DDPM | 10 |" in md and "--n 12" in md and "| early |" in md and "| 1, only for 0 <= t <= 4 |" in md
    assert "| 1, rescaled (phi 0.5) |" in md
    assert set(res["snapshots"]["early"]) == {"fid", "kid", "accuracy"}
    png = cm.memorisation_figure(samples, dist, idx, images, tmp_path / "mem.png", n_pairs=4)
    assert png.exists()
    with pytest.raises(ValueError, match="too large"):
        cm.evaluate(model, clf, du.make_schedule(10), images, labels, np.arange(5), class_names=names, n=2000)


def test_to_display_is_faithful():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = du.to_display(x)
    assert out.shape == (1, 1, 4, 3)
    assert np.allclose(out[0, 0, :, 0], [0, 0.5, 1, 1])
    flat = du.to_display(torch.zeros(3, 2, 2))  # a flat channel: no division by zero
    assert np.all(np.isfinite(flat)) and np.allclose(flat, 0.5)


def test_image_grid_layout():
    x = -torch.ones(5, 3, 16, 16)
    g = du.image_grid(x, nrow=4, pad=1)
    assert g.shape == (2 * 17 + 1, 4 * 17 + 1, 3)
    assert g[1, 1, 0] == 0 and g[0, 0, 0] == 1  # a sprite pixel (black) and the white padding


def test_animation_and_gif(tmp_path):
    frames = np.random.default_rng(0).uniform(-1, 1, (3, 4, 3, 16, 16))
    ani = du.plot_sample(frames, nrow=2, titles=["t=2", "t=1", "t=0"])
    assert isinstance(ani, FuncAnimation)
    html = du.animation_html(ani).data
    assert "<img" in html and html.count("data:image/png") == 3
    gif = save_gif(du.plot_sample(frames, nrow=2), tmp_path / "a.gif")
    from PIL import Image
    assert Image.open(gif).n_frames == 3
    with pytest.raises(ValueError, match="frames, B, 3, H, W"):
        du.plot_sample(frames[0])


def test_compare_solvers_rows_and_table():
    images, labels, _ = du.load_sprites()
    model, clf = du.ContextUnet(n_feat=8).eval(), cm.SpriteClassifier().eval()
    res = cm.compare_solvers(model, clf, du.make_schedule(10), images, labels, n=8, calls=(1, 3), progress=False)
    assert [(r["sampler"], r["calls"]) for r in res["rows"]] == [("ddim", 1), ("ddim", 3), ("dpm-solver", 1),
                                                                 ("dpm-solver", 3)]
    one_call = [r["fid"] for r in res["rows"] if r["calls"] == 1]
    assert one_call[0] == pytest.approx(one_call[1], rel=1e-3)  # one step: the two solvers coincide
    md = "\n".join(cm.solvers_markdown({**res, "command": "python diffusion_utilities.py evaluate --only-solvers"}))
    assert "| 3 |" in md and "--only-solvers" in md
    assert cm.solvers_markdown(None) == []


def test_only_solvers_updates_an_earlier_evaluation(tmp_path):
    from course_tools.cli import main

    with pytest.raises(SystemExit, match="run the full evaluate first"):
        main(["evaluate", "--only-solvers", "--out", str(tmp_path), "--n", "8", "--solver-calls", "1"])
    earlier = json.loads((du.WEIGHTS_DIR / "metrics.json").read_text())
    (tmp_path / "metrics.json").write_text(json.dumps(earlier))
    main(["evaluate", "--only-solvers", "--out", str(tmp_path), "--n", "8", "--solver-calls", "1", "2"])
    res = json.loads((tmp_path / "metrics.json").read_text())
    assert res["samplers"] == earlier["samplers"] and len(res["solvers"]["rows"]) == 4
    assert "--only-solvers" in res["solvers"]["command"] and "DPM-Solver++(2M)" in (tmp_path / "metrics.md").read_text()
