"""The research scripts stay runnable: each imports as research.<name> (`python -m research.<name>` from the
repository root) without doing any work, has a main(argv) whose --help answers, edits no sys.path and uses
only the public names of the module and the tools. Their real work (training, sampling) is not run here."""
import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "research").glob("*.py") if p.name != "__init__.py")


def test_there_are_scripts():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_imports_as_a_package_module_with_a_main(path):
    module = importlib.import_module(f"research.{path.stem}")
    assert callable(getattr(module, "main", None)), f"research/{path.name} has no main()"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_help_exits_cleanly(path, capsys):
    main = importlib.import_module(f"research.{path.stem}").main
    if not inspect.signature(main).parameters:
        pytest.skip("main() takes no argv")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("path", [*SCRIPTS, ROOT / "research" / "gpu_replay.sh"], ids=lambda p: p.name)
def test_no_sys_path_edits_and_run_as_modules(path):
    text = path.read_text()
    assert "sys.path" not in text, f"{path.name} edits sys.path; run it as `python -m research.{path.stem}`"
    assert "python research/" not in text and '"research/training_recipes.py"' not in text, (
        f"{path.name} still names a script path; the scripts run as `python -m research.<name>`")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_uses_only_public_names_of_other_modules(path):
    tree = ast.parse(path.read_text())
    modules, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            private += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            private.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert not private, f"{path.name} uses private names: {private}"
