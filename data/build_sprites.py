"""Build data/sprites16.npz: labelled 16x16 RGB sprites from Dungeon Crawl Stone Soup 0.28.0's tiles.

Run `bash data/download_crawl.sh` first (it fetches and unpacks Debian's `crawl` source tarball), then

    python data/build_sprites.py [--rltiles data/_crawl/stone_soup-0.28.0/source/rltiles] [--out data/sprites16.npz]

Deterministic: a sorted file walk, labels from folder names, and a seeded sampler for the hero
paper dolls. Needs only NumPy and Pillow and takes a few seconds. This script and download_crawl.sh
are the "source" of the derived dataset in the sense of the GPL (see data/README.md).
"""
import argparse
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ["hero", "non-hero", "food", "spell", "item"]
KEY_COLOUR = (71, 108, 108)  # rltiles' old transparency key
MIN_OPAQUE = 40  # fewer opaque pixels than this: a fragment, not a sprite
DOLL_SEED = 20240601
N_HEROES = 800
ITEM_FOLDERS = ("weapon", "armour", "wand", "staff", "rod", "ring", "amulet", "book", "misc", "scroll")
# Paper-doll layers in DCSS draw order, with the probability that a hero wears each one.
DOLL_LAYERS = [("cloak", 0.3), ("base", 1.0), ("boots", 0.6), ("legs", 0.6), ("body", 0.85),
               ("gloves", 0.4), ("hair", 0.6), ("beard", 0.15), ("head", 0.45), ("hand1", 0.9),
               ("hand2", 0.4)]


def load_rgba(path):
    """A tile as a float32 (H, W, 4) array in [0, 1], the key colour made transparent."""
    img = np.asarray(Image.open(path).convert("RGBA")).copy()
    key = np.all(img[..., :3] == KEY_COLOUR, axis=-1)
    img[key, 3] = 0
    return img.astype(np.float32) / 255.0


def excluded(rel):
    """Overlays, label tiles, brand glows, debug icons and macOS metadata are not sprites."""
    name = rel.name
    return (name.startswith(("i-", "wiz_", "._")) or "overlay" in name
            or "brands" in rel.parts)


def class_of(rel):
    """Class id of a tile from its path relative to rltiles/, or None when it is not used."""
    p = rel.parts
    if p[0] == "mon":
        return None if len(p) > 1 and p[1] in ("tentacles", "mutantbeast") else 1
    if p[:2] == ("item", "food"):
        return None if rel.name.startswith("bone") else 2
    if p[:2] in (("UNUSED", "food"), ("item", "potion")):
        return 2
    if p[:2] == ("gui", "spells") or p[:2] in (("gui", "invocations"), ("gui", "abilities")):
        return 3
    if p[0] == "item" and len(p) > 2 and p[1] in ITEM_FOLDERS:
        return None if ("bardings" in p or "uncollected_runes" in p) else 4
    return None


def usable(rgba):
    h, w = rgba.shape[:2]
    return h <= 48 and w <= 32 and int((rgba[..., 3] > 0).sum()) >= MIN_OPAQUE


def to_16(rgba):
    """Square crop around the opaque part, composite on white, area-downscale to 16x16.

    Returns (rgb uint8 (16, 16, 3), alpha uint8 (16, 16)).
    """
    h, w = rgba.shape[:2]
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    y0, y1, x0, x1 = ys.min() - 1, ys.max() + 2, xs.min() - 1, xs.max() + 2
    side = int(np.clip(max(y1 - y0, x1 - x0), 16, 48 if h > 32 else 32))
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top, left = cy - side // 2, cx - side // 2
    # Pad with transparency so crops that reach past the tile's edge stay square.
    pad = side
    padded = np.zeros((h + 2 * pad, w + 2 * pad, 4), np.float32)
    padded[pad:pad + h, pad:pad + w] = rgba
    crop = padded[top + pad:top + pad + side, left + pad:left + pad + side]
    a = crop[..., 3:4]
    rgb = crop[..., :3] * a + (1.0 - a)  # "over" pure white
    rgb8 = Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB")
    a8 = Image.fromarray(np.round(a[..., 0] * 255).astype(np.uint8), "L")
    rgb16 = np.asarray(rgb8.resize((16, 16), Image.BOX))
    a16 = np.asarray(a8.resize((16, 16), Image.BOX))
    return rgb16, a16


def over(top, bottom):
    """Alpha-composite `top` over `bottom`, both float (H, W, 4) with straight alpha."""
    at, ab = top[..., 3:4], bottom[..., 3:4]
    a = at + ab * (1 - at)
    rgb = (top[..., :3] * at + bottom[..., :3] * ab * (1 - at)) / np.maximum(a, 1e-8)
    return np.concatenate([rgb, a], axis=-1)


def doll_parts(root):
    """Sorted lists of 32x32 paper-doll layer files, per layer name."""
    parts = {}
    for layer, _ in DOLL_LAYERS:
        files = sorted(p for p in (root / "player" / layer).rglob("*.png") if not excluded(p))
        if layer == "base":
            files = [p for p in files if "shadow" not in p.name]
        if layer in ("hand1", "hand2"):
            files = [p for p in files if "misc" not in p.relative_to(root / "player" / layer).parts]
        parts[layer] = files
    return parts


def make_heroes(root, n, seed):
    """n unique composited paper dolls: list of (rgba float (32, 32, 4), recipe string)."""
    parts = doll_parts(root)
    rng = np.random.default_rng(seed)
    cache, seen, heroes = {}, set(), []
    attempts = 0
    while len(heroes) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError("could not make enough unique heroes; are the doll parts present?")
        chosen = []
        for layer, prob in DOLL_LAYERS:
            if rng.random() < prob:
                chosen.append(parts[layer][rng.integers(len(parts[layer]))])
        names = [c.parent.name + "/" + c.name for c in chosen]
        if any(n.startswith("head/") for n in names):
            chosen = [c for c in chosen if c.parent.name != "hair"]
        canvas = np.zeros((32, 32, 4), np.float32)
        for c in chosen:
            if c not in cache:
                cache[c] = load_rgba(c)
            layer = cache[c]
            if layer.shape != (32, 32, 4):
                continue
            canvas = over(layer, canvas)
        key = hashlib.sha256(np.round(canvas * 255).astype(np.uint8).tobytes()).digest()
        if key in seen or not usable(canvas):
            continue
        seen.add(key)
        recipe = "doll:" + "+".join(str(c.relative_to(root)) for c in chosen)
        heroes.append((canvas, recipe))
    return heroes


def build(root):
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"rltiles folder not found: {root}\nRun `bash data/download_crawl.sh` first.")
    tiles = []  # (rgba, label, source)
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root)
        label = class_of(rel)
        if label is None or excluded(rel):
            continue
        rgba = load_rgba(path)
        if usable(rgba):
            tiles.append((rgba, label, str(rel)))
    heroes = [(rgba, 0, recipe) for rgba, recipe in make_heroes(root, N_HEROES, DOLL_SEED)]

    images, alphas, labels, sources = [], [], [], []
    seen_rgba, seen_16 = set(), set()
    for rgba, label, source in heroes + tiles:
        k = hashlib.sha256(np.round(rgba * 255).astype(np.uint8).tobytes() + bytes(rgba.shape)).digest()
        if k in seen_rgba:
            continue
        seen_rgba.add(k)
        rgb16, a16 = to_16(rgba)
        k16 = hashlib.sha256(rgb16.tobytes()).digest()
        if k16 in seen_16:
            continue
        seen_16.add(k16)
        images.append(rgb16)
        alphas.append(a16)
        labels.append(label)
        sources.append(source)
    order = np.argsort(np.array(labels), kind="stable")  # class-sorted for a readable archive
    return dict(images=np.stack(images)[order], alpha=np.stack(alphas)[order],
                labels=np.array(labels, np.int64)[order], class_names=np.array(CLASS_NAMES),
                sources=np.array(sources)[order])


def main():
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rltiles", default=str(here / "_crawl/stone_soup-0.28.0/source/rltiles"))
    ap.add_argument("--out", default=str(here / "sprites16.npz"))
    args = ap.parse_args()
    data = build(args.rltiles)
    np.savez_compressed(args.out, **data)
    counts = np.bincount(data["labels"], minlength=len(CLASS_NAMES))
    print(f"wrote {args.out}: {len(data['labels'])} sprites")
    for name, c in zip(CLASS_NAMES, counts):
        print(f"  {name:9s} {c:5d}")
    print("images sha256:", hashlib.sha256(data["images"].tobytes()).hexdigest())


if __name__ == "__main__":
    main()
