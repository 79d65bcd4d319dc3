"""The package's layers import only downwards (DESIGN.md's module map), lazy imports included.

From the top: the CLI, tools, the loop, interop, build, engines, run, parallel, the model
(model, moe, data), the ground (config, seeding). A module may import its own layer or any
layer below it; an import that reaches up is how the import circles of old began.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trainer"

LAYERS = [  # top first: a module's layer is the first whose prefix names it
    ("cli", ("trainer.__main__", "trainer.__init__")),
    ("tools", ("trainer.tools",)),
    ("loop", ("trainer.train", "trainer.startup")),
    ("interop", ("trainer.interop",)),
    ("build", ("trainer.build",)),
    ("engines", ("trainer.engines",)),
    ("run", ("trainer.run",)),
    ("parallel", ("trainer.parallel",)),
    ("model", ("trainer.model", "trainer.moe", "trainer.data")),
    ("ground", ("trainer.config", "trainer.config_validation", "trainer.config_keys", "trainer.seeding", "trainer.launch_env")),
]


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to DESIGN.md's module map and to LAYERS")


def module_name(path: Path, package: Path) -> str:
    return ".".join(["trainer", *path.relative_to(package).with_suffix("").parts])


def imports_of(path: Path, package_dir: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of the package in `path`, at any depth."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "trainer" or target.startswith("trainer."):
                # `from . import x` may name a submodule: judge the deeper name when it is one
                for alias in node.names:
                    deeper = f"{target}.{alias.name}"
                    where = package_dir.parent / Path(*deeper.split("."))
                    is_module = where.with_suffix(".py").exists() or where.is_dir()
                    found.append((node.lineno, deeper if is_module else target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("trainer.")]
    return found


def upward_imports(package_dir: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        source, where = module_name(path, package_dir), path.relative_to(package_dir.parent)
        for line, target in imports_of(path, package_dir):
            if target == "trainer":
                problems.append(f"{where}:{line} imports the package root")
            elif layer_of(target) < layer_of(source):
                problems.append(f"{where}:{line}: {source} ({LAYERS[layer_of(source)][0]}) "
                                f"imports {target} ({LAYERS[layer_of(target)][0]}), a layer above it")
    return problems


def test_every_import_runs_down_the_layers():
    assert upward_imports() == []


def test_the_check_sees_upward_imports_lazy_ones_included(tmp_path):
    copy = tmp_path / "trainer"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "config.py", "a") as f:  # the ground reaching up into an engine, as config.py once did
        f.write("\n\ndef planted():\n    from .engines.deepspeed_zero import DeepSpeedZero\n")
    with open(copy / "data" / "corpus.py", "a") as f:
        f.write("\nfrom ..run import checkpoint\n")  # `from PACKAGE import MODULE` is judged by the module
    lines = len((copy / "config.py").read_text().splitlines())
    assert upward_imports(copy) == [
        f"trainer/config.py:{lines}: trainer.config (ground) imports trainer.engines.deepspeed_zero (engines), a layer "
        "above it",
        f"trainer/data/corpus.py:{len((copy / 'data' / 'corpus.py').read_text().splitlines())}: trainer.data.corpus "
        "(model) imports trainer.run.checkpoint (run), a layer above it"]


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path, PACKAGE))


def readme_tree_modules(readme: str) -> list[str]:
    """The modules the README's file tree lists under `trainer/` (one line each, two spaces in)."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trainer/ "))
    listed = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        if line.strip() and not line.startswith("   "):  # continuation lines are indented further
            listed.append(line.split()[0])
    return listed


def test_the_readme_tree_lists_every_module_once():
    on_disk = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))
    listed = readme_tree_modules((PACKAGE.parent / "README.md").read_text())
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == on_disk
