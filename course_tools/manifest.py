"""weights/manifest.json: each shipped file's sha256, kind, constructor arguments, how it was made, and
its headline numbers. A file and its entry change together: the manifest is rewritten atomically."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from diffusion_utilities import WEIGHTS_DIR


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(weights_dir=WEIGHTS_DIR):
    """weights/manifest.json as a dict: name -> entry (file, sha256, kind, how it was made, metrics)."""
    path = Path(weights_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no weights manifest at {path}; the shipped weights live in weights/ of the "
                                "repository (clone it whole)")
    try:
        weights = json.loads(path.read_text())["weights"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid manifest ({err}); restore it with `git checkout -- weights/`") from None
    root = Path(weights_dir).resolve()
    for name, entry in weights.items():
        file = (root / str(entry.get("file", ""))).resolve()
        if root not in file.parents:
            raise ValueError(f"{path}: entry {name!r} points outside {root} ({entry.get('file')!r}); refusing to load it")
    return weights


def checked_entry(name, weights_dir=WEIGHTS_DIR):
    """(path, entry) of a shipped file, after checking that the file exists and matches its sha256."""
    manifest = read_manifest(weights_dir)
    if name not in manifest:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(sorted(manifest))}")
    entry = manifest[name]
    path = Path(weights_dir) / entry["file"]
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} is listed in the manifest but missing; "
                                "restore it with `git checkout -- weights/`")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"weights file {path} does not match its manifest (sha256 {digest[:12]}..., expected "
                         f"{entry['sha256'][:12]}...): it was changed or damaged. Restore it with "
                         "`git checkout -- weights/` or re-download the repository.")
    return path, entry


def add_to_manifest(name, file, kind="ContextUnet", weights_dir=WEIGHTS_DIR, **info):
    """Record (or update) a weights file in weights/manifest.json with its sha256 and how it was made.

    kind: "ContextUnet" or "classifier"; info: e.g. args (constructor arguments), command, seed,
    train_minutes, hardware, metrics.
    """
    weights_dir = Path(weights_dir)
    path = weights_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"weights": {}}
    manifest["weights"][name] = {"file": str(file), "sha256": sha256_file(weights_dir / file), "kind": kind, **info}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return manifest["weights"][name]


def remove_from_manifest(name, weights_dir=WEIGHTS_DIR):
    """Delete a weights file and its manifest entry (e.g. a snapshot the new run no longer has)."""
    weights_dir = Path(weights_dir)
    path = weights_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["weights"].pop(name)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    (weights_dir / entry["file"]).unlink(missing_ok=True)
