"""Colab setup: install only the requirements Colab lacks, and never upgrade what it already has.

The notebooks' first cell clones the course in Colab and then calls `install_missing()`. Colab ships
torch, numpy, matplotlib, tqdm, pillow and ipywidgets 7.7; upgrading a package the runtime has already
imported leaves the old version in memory (and ipywidgets 8 does not render there), so a requirement
that is installed in any version is left alone. Standard library only: it runs before anything else.
"""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_IN_COLAB = ("jupyterlab",)  # the notebook app for running the course locally; Colab is its own


def requirement_name(line):
    """The distribution name of one requirements.txt line ('ipywidgets>=7.7,!=8.1.9' -> 'ipywidgets');
    None for blank lines and comments."""
    req = line.split("#", 1)[0].strip()
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0] if req else None


def missing_requirements(path=ROOT / "requirements.txt", skip=NOT_IN_COLAB):
    """The lines of requirements.txt whose package is not installed at all (in any version)."""
    missing = []
    for line in Path(path).read_text().splitlines():
        name = requirement_name(line)
        if name is None or name in skip:
            continue
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line.split("#", 1)[0].strip())
    return missing


def run_or_explain(cmd):
    """Run cmd; on failure raise with the command's own output (pip and git explain themselves)."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(map(str, cmd))}` failed (exit {done.returncode}):\n"
                           f"{(done.stderr or '') + (done.stdout or '')}".rstrip())
    return done


def install_missing(path=ROOT / "requirements.txt"):
    """pip-install the requirements that are not installed; print what was done. Returns that list."""
    missing = missing_requirements(path)
    if missing:
        print("installing what this runtime lacks:", ", ".join(missing))
        run_or_explain([sys.executable, "-m", "pip", "install", *missing])
    else:
        print("every package the course needs is already installed")
    return missing
