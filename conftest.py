"""Repository-wide pytest options.

Tests marked `slow` (subprocesses, torchrun, real training runs) run in the full suite, `python -m pytest`,
which also runs the notebooks; `python -m pytest tests`, the fast loop, leaves them out (`--run-slow` or
`-m slow` brings them back).

`python -m pytest notebooks --standin-device cuda` (or `mps`) runs every notebook with a stand-in GPU:
each notebook kernel starts inside tests/standin_device.py's StandinDevice, so `du.get_device()`
answers cuda (or mps), and a cell that mixes devices, turns a GPU tensor into numpy or uses float64
there fails as it would on a real GPU. CI runs this once (see .ci/run).
"""
import os
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent / "tests"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the tests marked slow in any selection")
    parser.addoption("--standin-device", choices=("cuda", "mps"), default=None,
                     help="run notebook kernels with a stand-in GPU of this kind (tests/standin_device.py)")


def pytest_configure(config):
    kind = config.getoption("--standin-device")
    if kind:  # IPython runs every file in profile_default/startup when a kernel starts
        ipython_dir = Path(tempfile.mkdtemp(prefix="ipython-standin-"))
        startup = ipython_dir / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-standin-device.py").write_text(
            f"from standin_device import StandinDevice\nStandinDevice({kind!r}).__enter__()\n")
        os.environ["IPYTHONDIR"] = str(ipython_dir)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))


def pytest_collection_modifyitems(config, items):
    """The fast loop (a selection without notebooks) skips slow tests unless asked for them."""
    full_suite = any(item.nodeid.endswith(".ipynb") or ".ipynb::" in item.nodeid for item in items)
    if full_suite or config.getoption("--run-slow") or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: runs in the full suite (python -m pytest) or with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
