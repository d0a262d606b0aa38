"""CI's second host (.ci/colab_like) runs in a throwaway venv that .ci/host_venv.py makes: it must see the
packages of whichever environment runs CI (a plain interpreter, a venv, a conda env), its own first."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOST_VENV = ROOT / ".ci" / "host_venv.py"


def python_of(venv_dir):
    return str(venv_dir / "bin" / "python")


def ask(python, code):
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def purelib(python):
    return Path(ask(python, "import sysconfig; print(sysconfig.get_path('purelib'))"))


def test_colab_like_makes_its_venv_with_host_venv():
    commands = [ln for ln in (ROOT / ".ci" / "colab_like").read_text().splitlines() if not ln.startswith("#")]
    assert 'python .ci/host_venv.py "$venv"' in commands and not [c for c in commands if "-m venv" in c]


@pytest.mark.slow  # makes two venvs in subprocesses
def test_host_venv_sees_a_user_venvs_packages_and_shadows_them(tmp_path):
    # A learner's venv U (no system site packages) holding a package the base interpreter lacks, and an
    # editable install (a .pth that points at a source folder).
    user = tmp_path / "user"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(user)], check=True)
    user_site = purelib(python_of(user))
    (user_site / "marker_pkg").mkdir()
    (user_site / "marker_pkg" / "__init__.py").write_text("WHERE = 'user venv'\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "editable_marker.py").write_text("WHERE = 'editable'\n")
    (user_site / "editable_marker.pth").write_text(f"{tmp_path / 'src'}\n")

    # colab_like's throwaway venv H, made by U's python (as `.ci/run` from inside U does).
    host = tmp_path / "host"
    subprocess.run([python_of(user), str(HOST_VENV), str(host), "--without-pip"], check=True)
    host_python = python_of(host)
    host_site = purelib(host_python)
    assert ask(host_python, "import marker_pkg, editable_marker; print(marker_pkg.WHERE, editable_marker.WHERE)") \
        == "user venv editable", "the throwaway venv must see the packages of the venv that made it"

    path = json.loads(ask(host_python, "import json, sys; print(json.dumps(sys.path))"))
    assert path.index(str(host_site)) < path.index(str(user_site)) < path.index(str(tmp_path / "src")), path
    # What colab_like's `pip install ipywidgets==7.7.1` relies on: a package in H shadows the environment's copy.
    (host_site / "marker_pkg").mkdir()
    (host_site / "marker_pkg" / "__init__.py").write_text("WHERE = 'throwaway venv'\n")
    assert ask(host_python, "import marker_pkg; print(marker_pkg.WHERE)") == "throwaway venv"
