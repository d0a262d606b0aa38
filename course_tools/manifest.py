"""weights/manifest.json: each shipped file's sha256, kind, constructor arguments, how it was made, and
its headline numbers. A file and its entry change together: the manifest is rewritten atomically.

Reading and checking live in the course module (load_pretrained needs them); they are re-exported here,
so `from course_tools.manifest import read_manifest` is the public name notebooks 3 and 4 use.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from course_tools.runs import write_atomic
from diffusion_utilities import WEIGHTS_DIR, checked_entry, read_manifest

__all__ = ["add_to_manifest", "checked_entry", "read_manifest", "record_metrics_in", "remove_from_manifest", "sha256_file"]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(weights_dir, manifest):
    write_atomic(Path(weights_dir) / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def add_to_manifest(name, file, kind="ContextUnet", weights_dir=WEIGHTS_DIR, **info):
    """Record (or update) a weights file in weights/manifest.json with its sha256 and how it was made.

    kind: "ContextUnet" or "classifier"; info: e.g. args (constructor arguments), command, seed,
    train_minutes, hardware, metrics.
    """
    path = Path(weights_dir) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"weights": {}}
    manifest["weights"][name] = {"file": str(file), "sha256": sha256_file(Path(weights_dir) / file), "kind": kind, **info}
    _write(weights_dir, manifest)
    return manifest["weights"][name]


def record_metrics_in(name, metrics, weights_dir=WEIGHTS_DIR):
    """Replace the "metrics" of an entry, keeping how the file was made (its sha256 is re-read from the file)."""
    entry = read_manifest(weights_dir)[name]
    kept = {k: v for k, v in entry.items() if k not in ("file", "sha256", "kind")}
    return add_to_manifest(name, entry["file"], entry["kind"], weights_dir, **{**kept, "metrics": metrics})


def remove_from_manifest(name, weights_dir=WEIGHTS_DIR):
    """Delete a weights file and its manifest entry (e.g. a snapshot the new run no longer has)."""
    manifest = json.loads((Path(weights_dir) / "manifest.json").read_text())
    entry = manifest["weights"].pop(name)
    _write(weights_dir, manifest)
    (Path(weights_dir) / entry["file"]).unlink(missing_ok=True)
