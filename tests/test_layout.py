"""The layout rules of DESIGN.md, checked on the source: the root holds what a user runs or edits (the entry
points and model.py), the library lives in the package `nanoshift/`; library modules never import an entry
point or the configurator, entry points never import each other (bench.py measures them, so it may), and the
project's own modules are imported at the top of a file, where a reader sees what it depends on."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "nanoshift"
ENTRY_POINTS = {"train", "analyze", "eval_benchmarks", "prepare_fineweb", "prepare_owt", "demo", "bench",
                "convert_checkpoint", "export_checkpoint", "seeds", "reproduce", "harness"}
MODEL = {"model"}  # the single-file GPT a researcher edits: at the root, but library code may import it
CONFIGURATOR = f"{PACKAGE}.configurator"


def library_modules(root=ROOT):
    folder = os.path.join(root, PACKAGE)
    return {f"{PACKAGE}.{f[:-3]}" for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}


def source_path(name, root=ROOT):
    return os.path.join(root, *name.split(".")) + ".py"


def project_imports(name, root=ROOT):
    """[(imported project module, at top level?)] for the project's modules that `name` imports (a root name
    like 'train', or 'nanoshift.lens')."""
    project = ENTRY_POINTS | MODEL | library_modules(root)
    with open(source_path(name, root)) as f:
        tree = ast.parse(f.read())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] if node.module != PACKAGE else [f"{PACKAGE}.{a.name}" for a in node.names]
        else:
            continue
        found += [(m, id(node) in top) for m in modules if m in project]
    return found


def test_the_root_holds_only_entry_points_and_the_model():
    files = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert files == ENTRY_POINTS | MODEL, (f"classify {files - ENTRY_POINTS - MODEL} here: a command users run "
                                           f"(an entry point) or a library module (move it into {PACKAGE}/)")


@pytest.mark.parametrize("name", sorted(library_modules() | MODEL))
def test_library_modules_import_only_library_modules(name):
    allowed = library_modules() | MODEL - {CONFIGURATOR}
    bad = [m for m, _ in project_imports(name) if m not in allowed]
    assert not bad, f"{name} imports {bad}: a library module must not import an entry point or the configurator"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS - {"bench"}))
def test_entry_points_do_not_import_each_other(name):
    bad = [m for m, _ in project_imports(name) if m in ENTRY_POINTS]
    assert not bad, f"{name}.py imports the entry point(s) {bad}: move the shared code into {PACKAGE}/"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS | MODEL | library_modules()))
def test_project_imports_are_at_the_top_of_the_file(name):
    inner = [m for m, at_top in project_imports(name) if not at_top]
    assert not inner, f"{name} imports {inner} inside a function: import the project's modules at the top"


def test_the_layout_rules_catch_a_violation(tmp_path):
    # the checks above must be able to fail: a library module importing an entry point inside a function
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "lens.py").write_text(
        "import os\n\ndef f():\n    import analyze\n    from nanoshift.configurator import configure\n")
    (tmp_path / PACKAGE / "configurator.py").write_text("")
    assert project_imports("nanoshift.lens", str(tmp_path)) == [("analyze", False), (CONFIGURATOR, False)]
