"""The code's shape: the course module imports nothing from the tools (the tools import it, one way), apart
from the `python diffusion_utilities.py <command>` entry; notebooks use public names only; tests leave sys.path
alone. (tests/test_research.py checks the research scripts' names.)"""
import ast
import json
import re
from pathlib import Path

import diffusion_utilities as du

ROOT = Path(du.__file__).resolve().parent


def tools_imports(tree):
    """(line, module) of every import of course_tools (or research) anywhere in tree, at any depth."""
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found += [(node.lineno, n) for n in names if n.split(".")[0] in ("course_tools", "research")]
    return found


def test_the_module_imports_the_tools_only_in_its_main_entry():
    tree = ast.parse((ROOT / "diffusion_utilities.py").read_text())
    main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    entry = [found for block in main_blocks for found in tools_imports(block)]
    assert [name for _, name in entry] == ["course_tools.cli"], entry
    allowed = {line for line, _ in entry}
    stray = [(line, name) for line, name in tools_imports(tree) if line not in allowed]
    assert not stray, f"diffusion_utilities.py imports the tools outside its __main__ entry: {stray}"


def test_a_stray_import_would_be_caught():
    lazy = ast.parse("def f():\n    from course_tools.metrics import SpriteClassifier\n")
    assert tools_imports(lazy) == [(2, "course_tools.metrics")]


def test_notebooks_use_public_names_of_the_module_and_the_tools():
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        private = re.findall(r"\bdu\._\w+|from course_tools[\w.]* import [^\n]*\b_\w+", code)
        assert not private, f"{nb.name} uses private names: {private}"


def test_tests_do_not_edit_sys_path():
    for path in [ROOT / "conftest.py", *sorted((ROOT / "tests").glob("*.py"))]:
        assert not re.search(r"sys\.path\.(insert|append)", path.read_text()), f"{path.name} edits sys.path"
