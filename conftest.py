"""Repository-wide pytest options.

`python -m pytest notebooks --standin-device cuda` (or `mps`) runs every notebook with a stand-in GPU:
each notebook kernel starts inside tests/standin_device.py's StandinDevice, so `du.get_device()`
answers cuda (or mps), and a cell that mixes devices, turns a GPU tensor into numpy or uses float64
there fails as it would on a real GPU. CI runs this once (see .ci/run).
"""
import os
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent / "tests"


def pytest_addoption(parser):
    parser.addoption("--standin-device", choices=("cuda", "mps"), default=None,
                     help="run notebook kernels with a stand-in GPU of this kind (tests/standin_device.py)")


def pytest_configure(config):
    kind = config.getoption("--standin-device")
    if kind:  # IPython runs every file in profile_default/startup when a kernel starts
        ipython_dir = Path(tempfile.mkdtemp(prefix="ipython-standin-"))
        startup = ipython_dir / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-standin-device.py").write_text(
            f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom standin_device import StandinDevice\n"
            f"StandinDevice({kind!r}).__enter__()\n")
        os.environ["IPYTHONDIR"] = str(ipython_dir)
