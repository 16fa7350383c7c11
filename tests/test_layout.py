"""The layout rules of DESIGN.md, checked on the source: library modules never import an entry point or the
configurator, entry points never import each other (bench.py measures them, so it may), and the project's
own modules are imported at the top of a file, where a reader sees what it depends on."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = {"common", "data", "prepare", "lens", "lm", "model", "checkpoint", "stats", "scoring", "harness", "groups"}
ENTRY_POINTS = {"train", "analyze", "eval_benchmarks", "prepare_fineweb", "prepare_owt", "demo", "bench",
                "convert_checkpoint", "export_checkpoint", "seeds", "reproduce"}
CONFIGURATOR = {"configurator"}
PROJECT = LIBRARY | ENTRY_POINTS | CONFIGURATOR


def project_imports(name):
    """[(imported module, at top level?)] for the project's modules that name.py imports."""
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module.split(".")[0]]
        else:
            continue
        found += [(m, id(node) in top) for m in modules if m in PROJECT]
    return found


def test_every_python_file_at_the_root_is_classified():
    files = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert files == PROJECT, f"classify the new module(s) {files - PROJECT} here (and in DESIGN/README)"


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_modules_import_only_library_modules(name):
    bad = [m for m, _ in project_imports(name) if m not in LIBRARY]
    assert not bad, f"{name}.py imports {bad}: a library module must not import an entry point or the configurator"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS - {"bench"}))
def test_entry_points_do_not_import_each_other(name):
    bad = [m for m, _ in project_imports(name) if m in ENTRY_POINTS]
    assert not bad, f"{name}.py imports the entry point(s) {bad}: move the shared code into a library module"


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_project_imports_are_at_the_top_of_the_file(name):
    inner = [m for m, at_top in project_imports(name) if not at_top]
    assert not inner, f"{name}.py imports {inner} inside a function: import the project's modules at the top"


def test_the_layout_rules_catch_a_violation(tmp_path, monkeypatch):
    # the checks above must be able to fail: a library module importing an entry point inside a function
    (tmp_path / "lens.py").write_text("import os\n\ndef f():\n    import analyze\n    from configurator import configure\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert project_imports("lens") == [("analyze", False), ("configurator", False)]
