"""Your own images as a course dataset: `python diffusion_utilities.py make-dataset DIR --size 16 --out data/mine.npz`.

DIR holds one subfolder per class (torchvision's ImageFolder convention). Each image is composited over
white (as our sprites are), padded (or cropped) to a square, resized, and stored in the same .npz format as
data/sprites16.npz: images uint8 (N, S, S, 3), alpha uint8 (N, S, S), labels int64 (N,), class_names (C,),
sources (N,) (paths relative to DIR). Exact duplicates are dropped; unreadable files are skipped and listed.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from course_tools.runs import write_atomic

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def resize_filter(source_size, size):
    """Pillow's filter for a square of source_size pixels resized to size: NEAREST when enlarging (pixel
    art stays crisp), BOX when shrinking by a whole factor (each output pixel is the mean of its block, so
    art drawn at that scale comes out exact), LANCZOS for any other shrink (smooth, without aliasing)."""
    from PIL import Image

    if size >= source_size:
        return Image.Resampling.NEAREST
    if source_size % size == 0:
        return Image.Resampling.BOX
    return Image.Resampling.LANCZOS


def to_square(img, fit="pad"):
    """An RGBA image made square: "pad" centres it on a transparent square, "crop" cuts the centre square."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    if fit == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s))
    s = max(w, h)
    square = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    square.paste(img, ((s - w) // 2, (s - h) // 2))
    return square


def load_image(path, size, fit="pad"):
    """(rgb uint8 (size, size, 3) composited over white, alpha uint8 (size, size)) from one image file."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # reads the whole file now, so a truncated one fails here
        rgba = to_square(img.convert("RGBA"), fit)
    rgba = rgba.resize((size, size), resize_filter(rgba.size[0], size))
    arr = np.asarray(rgba, dtype=np.float32)
    alpha = arr[..., 3:] / 255.0
    rgb = arr[..., :3] * alpha + 255.0 * (1 - alpha)
    return np.round(rgb).astype(np.uint8), arr[..., 3].astype(np.uint8)


def make_dataset(folder, size=16, fit="pad"):
    """Read folder/<class>/<image> into a dataset dict (see the module docstring) and a report dict:
    {"per_class": {name: kept}, "duplicates": n, "skipped": [(path, reason)]}."""
    folder = Path(folder)
    if not isinstance(size, int) or size < 4 or size % 4:
        raise ValueError(f"--size must be a multiple of 4 (the U-Net halves it twice), e.g. 16, 32 or 64; got {size}")
    if fit not in ("pad", "crop"):
        raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a folder with one subfolder of images per class")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} has no class subfolders: put each class's images in its own subfolder, "
                         f"e.g. {folder}/cats/1.png and {folder}/dogs/1.png")
    images, alphas, labels, sources, seen = [], [], [], [], set()
    report = {"per_class": {}, "duplicates": 0, "skipped": []}
    for label, cls in enumerate(classes):
        files = sorted(p for p in cls.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise ValueError(f"class folder {cls} holds no images ({', '.join(SUFFIXES)}); add some or remove it")
        kept = 0
        for path in files:
            try:
                rgb, alpha = load_image(path, size, fit)
            except Exception as err:  # any unreadable file is skipped and listed, never a crash halfway
                report["skipped"].append((str(path.relative_to(folder)), f"{type(err).__name__}: {err}"))
                continue
            digest = hashlib.sha256(rgb.tobytes() + alpha.tobytes()).hexdigest()
            if digest in seen:
                report["duplicates"] += 1
                continue
            seen.add(digest)
            images.append(rgb), alphas.append(alpha), labels.append(label)
            sources.append(str(path.relative_to(folder)))
            kept += 1
        report["per_class"][cls.name] = kept
    if len(images) < 2:
        raise ValueError(f"{folder} gave {len(images)} usable image(s); a dataset needs at least 2"
                         + (f" ({len(report['skipped'])} file(s) could not be read)" if report["skipped"] else ""))
    data = {"images": np.stack(images), "alpha": np.stack(alphas), "labels": np.array(labels, dtype=np.int64),
            "class_names": np.array([c.name for c in classes]), "sources": np.array(sources)}
    return data, report


def write_dataset(data, out):
    """Save a dataset dict as .npz, atomically (a failure leaves no half-written file)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **data)
    return write_atomic(out, buffer.getvalue())


def summary(data, report):
    """The printed summary: images per class, duplicates dropped, files skipped."""
    n, size = len(data["images"]), data["images"].shape[1]
    lines = [f"{n} images, {len(data['class_names'])} classes, {size}x{size}:"]
    lines += [f"  {name:20s} {k:6d}" for name, k in report["per_class"].items()]
    if report["duplicates"]:
        lines.append(f"dropped {report['duplicates']} exact duplicate(s)")
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} unreadable file(s):")
        lines += [f"  {path}: {reason}" for path, reason in report["skipped"]]
    return "\n".join(lines)
