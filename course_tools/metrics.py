"""How good are the samples? A sprite classifier, sprite-FID and KID on its features, memorisation,
and the evaluation that writes weights/metrics.md.

Inception weights cannot be downloaded at run time, and a network trained on our 16x16 sprites judges
them more sharply, so the features come from a small CNN trained on the sprites themselves.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_tools.hardware import computing_in
from course_tools.pictures import save_grid_png
from diffusion_utilities import (
    WEIGHTS_DIR,
    augment_batch,
    checked_entry,
    get_device,
    read_weights,
    sample_ddim,
    sample_ddpm,
    sample_dpm_solver,
    sample_flow,
    to_display,
    to_tensor_images,
)


class SpriteClassifier(nn.Module):
    """A small CNN that tells the sprite classes apart; its penultimate layer (128 features)
    is the feature space for sprite-FID and KID (Inception weights cannot be downloaded at run
    time, and a network trained on our 16x16 sprites judges them more sharply).

    forward(x) with x (B, 3, 16, 16) in [-1, 1] -> logits (B, n_classes); features(x) -> (B, 128).
    """

    def __init__(self, n_classes=5, width=32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.GELU())

        w = width
        self.body = nn.Sequential(block(3, w), block(w, w), nn.MaxPool2d(2),
                                  block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
                                  block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, n_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def load_classifier(device=None, weights_dir=WEIGHTS_DIR):
    """The shipped judging classifier (weights/classifier.pt, checked against its manifest sha256), in eval
    mode on device. Notebooks 3 and 5 use it to score samples: a public name the lessons may import."""
    path, entry = checked_entry("classifier", weights_dir)
    model = SpriteClassifier(**entry.get("args", {}))
    model.load_state_dict(read_weights(path)[0])
    return model.to(get_device(device)).eval()


def split_indices(labels, test_fraction=0.15, seed=0):
    """A stratified train/test split of sprite indices: (train_idx, test_idx), both sorted."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test.extend(idx[:max(1, int(round(test_fraction * len(idx))))])
    test = np.sort(np.array(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def train_classifier(images, labels, *, n_classes, epochs=30, batch_size=64, lr=2e-3, seed=0, progress=True):
    """Train a SpriteClassifier on uint8 images (N, 16, 16, 3) with labels (N,) in 0..n_classes - 1.
    Returns it in eval mode.

    Flips and a little Gaussian noise as augmentation, and a class-weighted loss so the rare food
    class counts.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = to_tensor_images(images)
    y_all = torch.as_tensor(labels).long()
    counts = torch.bincount(y_all, minlength=n_classes).float()
    class_w = (counts.sum() / (len(counts) * counts.clamp(min=1)))
    model = SpriteClassifier(n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n_batches = math.ceil(len(y_all) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * n_batches)
    model.train()
    for _ in tqdm(range(epochs), disable=not progress, desc="classifier"):
        perm = torch.randperm(len(y_all), generator=gen)
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = augment_batch(x_all[idx], generator=gen)
            x = x + 0.05 * torch.randn(x.shape, generator=gen)  # robustness to slightly noisy samples
            loss = F.cross_entropy(model(x), y_all[idx], weight=class_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classifier_outputs(classifier, x, batch_size=500):
    """(features (N, 128) float64 numpy, predicted class (N,) numpy) for images x (N, 3, 16, 16) in [-1, 1]."""
    classifier.eval()
    dev = next(classifier.parameters()).device
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(dev).float().clamp(-1, 1)
        f = classifier.features(xb)
        feats.append(f.cpu().double())  # float64 on the CPU only (Apple's GPUs have none)
        preds.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def frechet_distance(feats_a, feats_b):
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): the "FID" formula.

    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the trace of the matrix square root
    taken from the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so numpy's eigh is enough).
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature arrays (N, D) with the same D and N >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def kernel_inception_distance(feats_a, feats_b, n_subsets=50, subset_size=500, seed=0):
    """KID: the unbiased squared MMD with kernel k(x, y) = (x.y / D + 1)^3, averaged over random
    subsets. Returns (mean, std). Unlike FID it has no bias at small n, so numbers at different n
    compare; the real-vs-real value is about 0.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    vals = []
    for _ in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = m * (m - 1)
        vals.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def nearest_neighbours(samples, train_images):
    """For each sample, its nearest training sprite (flips included, as the model trains on flips).

    samples: (N, 3, H, W) in [-1, 1]; train_images: uint8 (M, H, W, 3).
    Returns (index (N,) into train_images, rms distance (N,) in [0, 1] pixel units, flipped (N,) bool).
    """
    s = torch.as_tensor(to_display(samples)).reshape(len(samples), -1).double()
    t = torch.as_tensor(to_display(to_tensor_images(train_images))).double()  # (M, H, W, 3) in [0, 1]
    both = torch.cat([t.reshape(len(t), -1), t.flip(2).reshape(len(t), -1)])
    d2 = torch.cdist(s, both).pow(2) / s.shape[1]
    best = d2.argmin(1)
    return (best % len(t)).numpy(), d2.gather(1, best[:, None])[:, 0].sqrt().numpy(), (best >= len(t)).numpy()



NEAR_COPY_RMS = 0.06  # rms pixel difference (0..1 scale) below which a sample counts as a near-copy


def generate(model, schedule, labels, sampler="ddim", n_steps=25, eta=0.0, guide_w=0.0, seed=0,
             batch_size=250, amp_dtype=None, progress=True, guide_interval=None, guide_rescale=0.0):
    """Samples for the given class ids (N,), in batches: (images (N, 3, H, W) on the CPU, seconds).

    sampler: "ddpm" (T steps), "ddim", "dpm-solver" or "euler" (sample_flow: a flow model, schedule None, or a
    diffusion model on its schedule), n_steps network calls each;
    guide_interval (the steps (low, high) where guidance acts) and guide_rescale as in predict_noise;
    amp_dtype: the network's autocast dtype while sampling (None: fp32), see ContextUnet.autocast_dtype."""
    from tqdm.auto import tqdm

    if sampler == "euler" and (guide_interval is not None or guide_rescale):
        raise ValueError("the Euler sampler (sample_flow) takes no guide_interval or guide_rescale")
    labels = torch.as_tensor(labels).long()
    gen = torch.Generator().manual_seed(seed)
    out, t0 = [], time.time()
    for i in tqdm(range(0, len(labels), batch_size), disable=not progress,
                  desc=f"{sampler}-{schedule.T if sampler == 'ddpm' else n_steps} w={guide_w}"):
        lab = labels[i:i + batch_size]
        common = dict(context=lab, guide_w=guide_w, generator=gen, guide_interval=guide_interval,
                      guide_rescale=guide_rescale)
        with computing_in(model, amp_dtype):
            if sampler == "ddpm":
                x, _ = sample_ddpm(model, len(lab), schedule, save_rate=schedule.T, **common)
            elif sampler == "dpm-solver":
                x, _ = sample_dpm_solver(model, len(lab), schedule, n_steps=n_steps, **common)
            elif sampler == "euler":
                x, _, _ = sample_flow(model, len(lab), schedule, n_steps=n_steps, context=lab, guide_w=guide_w,
                                      generator=gen)
            else:
                x, _ = sample_ddim(model, len(lab), schedule, n_steps=n_steps, eta=eta, **common)
        out.append(x.cpu())
    return torch.cat(out), time.time() - t0


def real_split(n_sprites, n, seed):
    """Indices of two disjoint random sets of n real sprites (reference, other), the same for a seed."""
    if 2 * n > n_sprites:
        raise ValueError(f"n={n} is too large: the floor needs two disjoint sets of n real sprites "
                         f"(at most {n_sprites // 2})")
    perm = np.random.default_rng(seed).permutation(n_sprites)
    return perm[:n], perm[n:2 * n]


def real_sets(classifier, images, labels, n, seed):
    """Two disjoint random sets of n real sprites (real_split) as classifier features (reference, other), and
    the class ids of the second set: samples are made for these, so they share the real data's class mix."""
    labels = np.asarray(labels)
    ref_idx, other_idx = real_split(len(labels), n, seed)
    real_ref, _ = classifier_outputs(classifier, to_tensor_images(images[ref_idx]))
    real_other, _ = classifier_outputs(classifier, to_tensor_images(images[other_idx]))
    return real_ref, real_other, labels[other_idx]


def compare_solvers(model, classifier, schedule, images, labels, n=1000, seed=0, calls=(5, 10, 20, 50),
                    amp_dtype=None, progress=True):
    """Quality against network calls: sprite-FID, KID and class accuracy of DDIM (eta 0) and
    DPM-Solver++(2M) at each number of calls, on the same real sets and seeds as evaluate (w = 0).
    Returns {"n", "seed", "floor_fid", "rows": [{sampler, calls, s_per_sample, fid, kid, accuracy}]}."""
    real_ref, real_other, gen_labels = real_sets(classifier, images, labels, n, seed)
    rows = []
    for sampler in ("ddim", "dpm-solver"):
        for k in calls:
            x, secs = generate(model, schedule, gen_labels, sampler, k, 0.0, 0.0, seed, amp_dtype=amp_dtype,
                               progress=progress)
            rows.append({"sampler": sampler, "calls": k, "s_per_sample": secs / n,
                         **sample_scores(classifier, x, real_ref, gen_labels)})
    return {"n": n, "seed": seed, "amp_dtype": str(amp_dtype), "floor_fid": frechet_distance(real_other, real_ref),
            "rows": rows}


def sample_scores(classifier, x, real_ref, labels):
    """FID and KID of samples x against the real features real_ref, and the share classified as labels."""
    f, pred = classifier_outputs(classifier, x)
    return {"fid": frechet_distance(f, real_ref), "kid": kernel_inception_distance(f, real_ref)[0],
            "accuracy": float((pred == labels).mean())}


def guided_scores(model, classifier, schedule, real_ref, gen_labels, class_names, guide_w, *, per_class=100,
                  n_steps=25, seed=0, guide_interval=None, guide_rescale=0.0, amp_dtype=None, progress=True):
    """One row of evaluate's guidance table, DDIM-n_steps (eta 0) with guidance weight guide_w (only for t in
    guide_interval when given, rescaled by guide_rescale): sample_scores of samples made for gen_labels (noise
    seed) against real_ref, and the classifier's accuracy per class and balanced on per_class samples of every
    class (seed + 1)."""
    guidance = dict(guide_interval=guide_interval, guide_rescale=guide_rescale, amp_dtype=amp_dtype, progress=progress)
    x, _ = generate(model, schedule, gen_labels, "ddim", n_steps, 0.0, guide_w, seed, **guidance)
    balanced = np.repeat(np.arange(len(class_names)), per_class)
    xb, _ = generate(model, schedule, balanced, "ddim", n_steps, 0.0, guide_w, seed + 1, **guidance)
    _, pred = classifier_outputs(classifier, xb)
    return {"guide_w": guide_w, "guide_interval": guide_interval and list(guide_interval), "guide_rescale": guide_rescale,
            **sample_scores(classifier, x, real_ref, gen_labels),
            "class_accuracy": {name: float((pred[balanced == c] == c).mean()) for c, name in enumerate(class_names)},
            "balanced_accuracy": float((pred == balanced).mean())}


def evaluate(model, classifier, schedule, images, labels, test_idx, *, class_names, n=1000, seed=0,
             guide_ws=(0, 1, 2, 4), ddim_steps=(10, 25, 50, 100), etas=(0.0, 1.0), per_class=100, guide_steps=25,
             amp_dtype=None, progress=True, snapshots=None, guide_interval=None, guide_rescale=None):
    """All the quality numbers of the shipped model, as a dict (see `python diffusion_utilities.py evaluate`).

    images, labels: the whole sprite set (uint8 (N, 16, 16, 3), (N,)); test_idx: the classifier's
    held-out sprites; class_names: the data file's names of classes 0, 1, ... FID and KID compare n
    samples, made for the class ids of n random real sprites, with n other real sprites; the
    real-vs-real floor compares two disjoint sets of n real sprites.
    snapshots: optional {name: model} scored the same way with DDIM-{guide_steps} only (training progress).
    guide_interval: (low, high) steps; each w > 0 gets a second guided row with guidance only there.
    guide_rescale: phi in (0, 1]; each w > 0 gets one more row with guidance rescaled (rescale_guidance).
    Returns (results dict, the DDPM samples, their nearest training sprites' indices and distances).
    """
    labels = np.asarray(labels)
    real_ref, real_other, gen_labels = real_sets(classifier, images, labels, n, seed)
    res = {"n": n, "seed": seed, "amp_dtype": str(amp_dtype), "near_copy_rms": NEAR_COPY_RMS,
           "guide_steps": guide_steps}
    res["floor"] = {"fid": frechet_distance(real_other, real_ref),
                    "kid": kernel_inception_distance(real_other, real_ref)[0]}
    _, test_pred = classifier_outputs(classifier, to_tensor_images(images[test_idx]))
    test_lab = labels[test_idx]
    res["classifier_test_accuracy"] = {
        "all": float((test_pred == test_lab).mean()),
        **{name: float((test_pred[test_lab == c] == c).mean()) for c, name in enumerate(class_names)}}

    samplers = [("ddpm", schedule.T, 1.0, amp_dtype)] + [("ddim", k, e, amp_dtype) for e in etas for k in ddim_steps]
    if amp_dtype is not None:  # one row in plain fp32, to show that autocast does not change the quality
        samplers.append(("ddim", guide_steps, 0.0, None))
    res["samplers"] = []
    for name, steps, eta, amp in samplers:
        x, secs = generate(model, schedule, gen_labels, name, steps, eta, 0.0, seed, amp_dtype=amp,
                           progress=progress)
        row = {"sampler": name, "steps": steps, "eta": eta, "autocast": str(amp), "s_per_sample": secs / n,
               **sample_scores(classifier, x, real_ref, gen_labels)}
        res["samplers"].append(row)
        if name == "ddpm":
            ddpm_samples = x
    idx, dist, _ = nearest_neighbours(ddpm_samples, images)
    res["memorisation"] = {"sampler": "ddpm", "median_rms": float(np.median(dist)),
                           "near_copy_fraction": float((dist < NEAR_COPY_RMS).mean())}
    settings = ([(w, None, 0.0) for w in guide_ws] + [(w, guide_interval, 0.0) for w in guide_ws if w > 0 and guide_interval]
                + [(w, None, guide_rescale) for w in guide_ws if w > 0 and guide_rescale])
    res["guidance"] = [guided_scores(model, classifier, schedule, real_ref, gen_labels, class_names, w,
                                     per_class=per_class, n_steps=guide_steps, seed=seed, guide_interval=interval,
                                     guide_rescale=phi, amp_dtype=amp_dtype, progress=progress)
                       for w, interval, phi in settings]
    res["snapshots"] = {}
    for name, snap in (snapshots or {}).items():
        x, _ = generate(snap, schedule, gen_labels, "ddim", guide_steps, 0.0, 0.0, seed, amp_dtype=amp_dtype,
                        progress=progress)
        res["snapshots"][name] = sample_scores(classifier, x, real_ref, gen_labels)
    return res, ddpm_samples, idx, dist


def metrics_markdown(res, command):
    """The evaluation dict as the markdown tables written to weights/metrics.md."""
    fl = res["floor"]
    lines = ["# Quality of the shipped sprite model", "",
             f"Reproduce: `{command}`", "",
             f"FID and KID: on the 128 penultimate features of the project's SpriteClassifier, n = {res['n']} "
             f"samples (class mix of the real data, guidance w = 0 unless stated) against n = {res['n']} real "
             f"sprites. Real-vs-real floor at the same n: **FID {fl['fid']:.2f}**, KID {fl['kid']:.4f}. "
             f"Network run with autocast dtype {res['amp_dtype']}.", "",
             "## Samplers", "",
             "| sampler | steps | eta | autocast | s / sample | sprite-FID | FID / floor | KID | class accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["samplers"]:
        lines.append(f"| {r['sampler'].upper()} | {r['steps']} | {r['eta']:g} | {r['autocast']} | {r['s_per_sample']:.4f} | "
                     f"{r['fid']:.2f} | {r['fid'] / fl['fid']:.1f}x | {r['kid']:.4f} | {r['accuracy']:.1%} |")
    acc = res["classifier_test_accuracy"]
    names = [k for k in acc if k != "all"]  # the class names, in class-id order (as evaluate wrote them)
    lines += ["", f"## Classifier-free guidance (DDIM-{res['guide_steps']}, eta 0)", "",
              "Per-class accuracy: the classifier's verdict on "
              "samples made for each class (balanced set), beside its accuracy on held-out real sprites.", "",
              "| guide_w | FID | KID | " + " | ".join(names) + " | mean |",
              "|---" * (4 + len(names)) + "|",
              "| real held-out | – | – | " + " | ".join(f"{acc[c]:.0%}" for c in names)
              + f" | {np.mean([acc[c] for c in names]):.0%} |"]
    for g in res["guidance"]:
        ca, interval, phi = g["class_accuracy"], g.get("guide_interval"), g.get("guide_rescale")
        where = f", only for {interval[0]} <= t <= {interval[1]}" if interval else ""
        where += f", rescaled (phi {phi:g})" if phi else ""
        lines.append(f"| {g['guide_w']:g}{where} | {g['fid']:.2f} | {g['kid']:.4f} | "
                     + " | ".join(f"{ca[c]:.0%}" for c in names) + f" | {g['balanced_accuracy']:.0%} |")
    if res.get("snapshots"):
        lines += ["", f"## Training progress (DDIM-{res['guide_steps']}, eta 0, w = 0)", "",
                  "| model | sprite-FID | KID | class accuracy |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['fid']:.2f} | {v['kid']:.4f} | {v['accuracy']:.1%} |" for k, v in res["snapshots"].items()]
    lines += solvers_markdown(res.get("solvers"))
    m = res["memorisation"]
    lines += ["", "## Memorisation (DDPM-500 samples vs their nearest training sprite, flips included)", "",
              f"Median rms pixel distance {m['median_rms']:.3f} (0..1 scale); near-copies (rms < "
              f"{res['near_copy_rms']}): {m['near_copy_fraction']:.1%}. Pairs: `memorisation.png`.", ""]
    return "\n".join(lines)


def memorisation_figure(samples, dist, neighbour_idx, images, path, n_pairs=16):
    """A PNG of sample / nearest-training-sprite pairs: the closest half, then random ones."""
    order = np.argsort(dist)
    rng = np.random.default_rng(0)
    pick = np.concatenate([order[:n_pairs // 2], rng.choice(order[n_pairs // 2:], n_pairs - n_pairs // 2, False)])
    pairs = torch.stack([torch.stack([samples[i], to_tensor_images(images[neighbour_idx[i]][None])[0]])
                         for i in pick])  # (n_pairs, 2, 3, H, W)
    grid = pairs.permute(1, 0, 2, 3, 4).reshape(-1, *samples.shape[1:])  # row 1 samples, row 2 neighbours
    return save_grid_png(grid, path, nrow=n_pairs, scale=4)


def solvers_markdown(solvers):
    """compare_solvers' result (with its "command") as a markdown section; [] when there is none."""
    if not solvers:
        return []
    lines = ["", "## Fewer network calls: DDIM against DPM-Solver++(2M) (w = 0)", "",
             f"Reproduce: `{solvers['command']}` (n = {solvers['n']}, same real sets and seeds as above, "
             f"autocast {solvers['amp_dtype']}).", "",
             "| network calls | DDIM (eta 0) sprite-FID | DPM-Solver++(2M) sprite-FID | DDIM accuracy | DPM-Solver accuracy |",
             "|---|---|---|---|---|"]
    by = {(r["sampler"], r["calls"]): r for r in solvers["rows"]}
    for k in sorted({r["calls"] for r in solvers["rows"]}):
        d, p = by.get(("ddim", k)), by.get(("dpm-solver", k))
        lines.append(f"| {k} | {d['fid']:.2f} | {p['fid']:.2f} | {d['accuracy']:.1%} | {p['accuracy']:.1%} |")
    return lines
