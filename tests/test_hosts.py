"""Where learners open the course: the Colab setup cell, the two requirement files, ipywidgets 7.7 and 8.

The setup cell is run as Colab runs it (a stand-in `google.colab` module, a fresh folder for /content,
the repository URL pointed at a local git repository) and run again as after a runtime restart.
"""
import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from course_tools import colab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SETUP_LINE = re.compile(r'^REPO, BRANCH = "(?P<repo>[^"]+)", "(?P<branch>[^"]+)"', re.M)


def cell_source(path, index):
    return "".join(json.loads(path.read_text())["cells"][index]["source"])


def setup_cell():
    return cell_source(NOTEBOOKS[0], 1)


# -- the setup cell ---------------------------------------------------------------------------------

@pytest.fixture
def course_repo(tmp_path):
    """A git repository shaped like the course (module, notebooks/, requirements, the Colab helper)."""
    src = tmp_path / "origin"
    (src / "notebooks").mkdir(parents=True)
    (src / "course_tools").mkdir()
    (src / "diffusion_utilities.py").write_text("# stand-in for the course module\n")
    (src / "notebooks" / "README").write_text("notebooks live here\n")
    for name in ("requirements.txt", "course_tools/__init__.py", "course_tools/colab.py"):
        (src / name).write_text((ROOT / name).read_text())
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(src)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "course"], check=True)
    return src


@pytest.fixture
def colab_runtime(tmp_path, monkeypatch):
    """A stand-in Colab: google.colab importable, a fresh /content as the working folder, and every pip
    call recorded instead of run (git runs for real)."""
    content = tmp_path / "content"
    content.mkdir()
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.chdir(content)
    monkeypatch.setattr(sys, "path", list(sys.path))
    calls = []
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        calls.append(list(map(str, cmd)))
        if "pip" in cmd:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    return content, calls


def run_setup(repo_url, branch="main"):
    src = SETUP_LINE.sub(f'REPO, BRANCH = "{repo_url}", "{branch}"', setup_cell())
    exec(compile(src, "setup cell", "exec"), {"__name__": "__main__"})


@pytest.mark.slow  # runs git in subprocesses
def test_setup_cell_survives_a_restart_and_installs_nothing_colab_has(course_repo, colab_runtime, monkeypatch):
    content, calls = colab_runtime
    run_setup(f"file://{course_repo}")
    home = content / course_repo.name
    assert Path.cwd() == home / "notebooks" and (home / "diffusion_utilities.py").exists()
    assert str(home) in sys.path
    assert [c[:2] for c in calls] == [["git", "clone"]]

    # A runtime restart: the kernel starts in /content again, the checkout is still there.
    monkeypatch.chdir(content)
    run_setup(f"file://{course_repo}")
    assert Path.cwd() == home / "notebooks"
    assert [c[:2] for c in calls] == [["git", "clone"]], "a restart must not clone again"
    assert not [c for c in calls if "pip" in c], "everything is installed here, so pip must not run"


@pytest.mark.slow  # runs git in subprocesses
def test_setup_cell_installs_only_what_is_missing(course_repo, colab_runtime, monkeypatch):
    content, calls = colab_runtime
    real_version = importlib.metadata.version

    def version(name):
        if name == "tqdm":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    run_setup(f"file://{course_repo}")
    pip = [c for c in calls if "pip" in c]
    assert len(pip) == 1 and pip[0][-1] == "tqdm>=4.65" and pip[0][-2] == "install", pip


@pytest.mark.slow  # runs git in subprocesses
def test_setup_cell_shows_gits_own_error(tmp_path, colab_runtime):
    with pytest.raises(RuntimeError, match=r"git clone .* failed:(.|\n)*(does not exist|not appear to be a git)"):
        run_setup(f"file://{tmp_path / 'nowhere'}")


@pytest.mark.slow  # runs git in subprocesses
def test_setup_cell_explains_a_leftover_folder(course_repo, colab_runtime):
    content, _ = colab_runtime
    (content / course_repo.name / "half").mkdir(parents=True)  # an interrupted clone
    with pytest.raises(RuntimeError, match=r"already exists(.|\n)*rm -rf"):
        run_setup(f"file://{course_repo}")


def test_a_failing_pip_shows_its_own_output(monkeypatch):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for tqdm>=99")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(RuntimeError, match=r"pip install tqdm>=99` failed \(exit 1\):\nERROR: No matching"):
        colab.run_or_explain([sys.executable, "-m", "pip", "install", "tqdm>=99"])


def test_missing_requirements_never_upgrades(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# a comment\nnumpy>=999  # installed, but older: left alone\n"
                    "no-such-package-xyz>=1.0\njupyterlab>=4.0\n\n")
    assert colab.missing_requirements(reqs) == ["no-such-package-xyz>=1.0"]


def test_every_notebook_has_the_same_setup_cell_and_agrees_with_the_readme():
    sources = {nb.name: cell_source(nb, 1) for nb in NOTEBOOKS}
    assert len(set(sources.values())) == 1, "the setup cells differ"
    repo, branch = SETUP_LINE.search(setup_cell()).group("repo", "branch")
    assert sum(repo in line for line in setup_cell().splitlines()) == 1, "the URL lives in one line"
    owner_name = repo.removeprefix("https://github.com/")
    for nb in NOTEBOOKS:
        badge = f"https://colab.research.google.com/github/{owner_name}/blob/{branch}/notebooks/{nb.name}"
        assert badge in cell_source(nb, 0), f"{nb.name}: its Colab badge must open {badge}"
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/([^/]+)/notebooks/([\w.]+)", readme)
    assert len(links) >= len(NOTEBOOKS)
    for where, br, name in links:
        assert (where, br) == (owner_name, branch) and (ROOT / "notebooks" / name).exists(), (where, br, name)
    for mention in re.findall(r"github\.com/([\w.-]+/[\w.-]+)", readme.replace("colab.research.google.com/github/", "")):
        if mention.endswith("how-diffusion-models-work"):
            assert mention == owner_name


def test_the_setup_cell_shows_as_one_line_where_the_host_allows():
    """Colab's form view shows only the `# @title` line; JupyterLab and VS Code collapse the input."""
    for nb in NOTEBOOKS:
        cell = json.loads(nb.read_text())["cells"][1]
        first = "".join(cell["source"]).splitlines()[0]
        assert first.startswith("# @title Setup"), f"{nb.name}: the setup cell's first line is {first!r}"
        assert cell["metadata"].get("cellView") == "form", f"{nb.name}: no Colab form view"
        assert cell["metadata"].get("jupyter", {}).get("source_hidden") is True, f"{nb.name}: input not collapsed"


# -- requirements -----------------------------------------------------------------------------------

def requirements(name):
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / name).read_text().splitlines()]
    return [ln for ln in lines if ln]


def test_learner_and_developer_requirements_are_apart():
    learner = {Requirement(r).name: Requirement(r) for r in requirements("requirements.txt")}
    assert {"torch", "numpy", "matplotlib", "tqdm", "ipywidgets", "pillow", "jupyterlab"} <= set(learner)
    assert not {"nbval", "pytest", "ruff"} & set(learner), "test tools belong in requirements-dev.txt"
    dev = requirements("requirements-dev.txt")
    assert "-r requirements.txt" in dev and {"nbval", "pytest", "ruff"} <= {Requirement(r).name for r in dev if r[0] != "-"}
    assert "requirements-dev.txt" in (ROOT / ".ci" / "run").read_text()


def test_ipywidgets_range_takes_colabs_and_skips_the_one_vs_code_cannot_show():
    spec = next(Requirement(r) for r in requirements("requirements.txt") if r.startswith("ipywidgets")).specifier
    assert spec.contains("7.7.1") and spec.contains("8.1.8") and spec.contains("8.1.5")
    assert not spec.contains("8.1.9") and not spec.contains("7.6.5")


# -- the widget cells, under whichever ipywidgets is installed (CI runs this under 7.7 and 8) ------

def widget_cells():
    """(notebook, cell source, names of the functions it makes interactive) for every widget cell."""
    found = []
    for nb in NOTEBOOKS:
        for cell in json.loads(nb.read_text())["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] == "code" and re.search(r"widgets\.interact", src):
                calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
                         and isinstance(n.func, ast.Attribute) and n.func.attr.startswith("interact")]
                found.append((nb.name, src, [c.args[0].id for c in calls]))
    return found


def literal_names(nb_name):
    """NAME = <literal> assignments anywhere in a notebook (the options lists the sliders use)."""
    names = {}
    for cell in json.loads((ROOT / "notebooks" / nb_name).read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse("".join(ln for ln in cell["source"] if not ln.startswith("%")))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    names[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    return names


@pytest.mark.parametrize("nb_name, src, callbacks", widget_cells(), ids=lambda v: v if isinstance(v, str)
                         and v.endswith(".ipynb") else "")
def test_widget_cells_drive_their_function(nb_name, src, callbacks):
    import ipywidgets

    seen = []
    namespace = {**literal_names(nb_name), "T": 500, "widgets": ipywidgets}
    for name in callbacks:
        namespace[name] = lambda **kw: seen.append(kw)
    exec(compile(src, nb_name, "exec"), namespace)
    for name in callbacks:
        box = namespace[name].widget  # interact returns the function with its widget attached
        if getattr(box, "manual_button", None) is not None:  # interact_manual waits for its button
            box.manual_button.click()
        else:
            box.update()  # what showing it in a notebook does (ipywidgets 7 runs it when displayed, 8 at once)
        assert seen, f"{nb_name}: the widget cell did not call {name} with its start values"
        controls = [w for w in box.children if hasattr(w, "value") and getattr(w, "description", "")]
        assert controls
        for w in controls:
            options = list(getattr(w, "options", []) or []) or [w.max if w.value != w.max else w.min]
            other = next(o for o in options if o != w.value)
            other = other[1] if isinstance(other, tuple) else other
            before = len(seen)
            w.value = other
            if getattr(box, "manual_button", None) is not None:
                box.manual_button.click()
            assert len(seen) > before and other in seen[-1].values(), \
                f"{nb_name}: moving {w.description!r} to {other!r} did not reach {name} (ipywidgets {ipywidgets.__version__})"
