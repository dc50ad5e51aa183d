"""The package's folders are its stages, and imports run one way: from a stage only to stages before it.

Read from the source (every import statement, also those inside functions), so an import added
anywhere that runs back up the flow fails here with the module and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cachetrain"

# stage -> the stages it may import (root is the package's own top-level modules)
MAY_IMPORT = {
    "root": set(),
    "models": {"root"},
    "cache": {"root", "models"},
    "train": {"root", "models"},
    "sample": {"root", "models", "train"},
    "view": {"root", "models", "train", "cache"},  # the cache tools prepare images as the cache does
    "tiny": {"root", "models"},
}
# top-level modules that stand above every stage: the console commands (each imports its stage when
# called) and the kept import paths (each is one stage's module under its old name)
ENTRY_MODULES = {"commands", "t5", "flow", "export", "inspect"}


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in MAY_IMPORT else "root"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute cachetrain module) for every import of the package in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("cachetrain"):
                continue
            # `from . import x` and `from ..models import loading` name modules, not attributes
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                exists = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*candidate.split("."))).is_dir()
                found.append((node.lineno, candidate if exists else target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("cachetrain")]
    return found


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_subpackage_is_a_known_stage_with_a_docstring_saying_what_it_owns():
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(MAY_IMPORT) - {"root"}
    for stage in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and "Owns" in doc and "Imports" in doc, f"cachetrain/{stage}/__init__.py must say what it owns and imports"


def test_no_module_imports_a_later_stage():
    backwards = []
    for path in package_modules():
        name = module_name(path)
        if name.split(".")[-1] in ENTRY_MODULES and stage_of(name) == "root":
            continue
        stage = stage_of(name)
        for line, target in imported_modules(path):
            target_stage = stage_of(target)
            if target_stage != stage and target_stage not in MAY_IMPORT[stage]:
                backwards.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({stage}) imports {target} ({target_stage})")
    assert not backwards, "imports against the flow:\n" + "\n".join(backwards)


def test_the_graph_reader_sees_relative_and_function_level_imports(tmp_path):
    # the rule above is only as good as the reader: a backwards import inside a function must show
    source = PACKAGE / "cache" / "plan.py"
    seen = dict((target, line) for line, target in imported_modules(source))
    assert "cachetrain.sidecar" in seen and "cachetrain.cache.summary" in seen
    found = {target for _, target in imported_modules(PACKAGE / "commands.py")}
    assert "cachetrain.train.trainer" in found  # imported inside a function there


def test_no_import_cycles_between_modules():
    graph = {module_name(path): {t for _, t in imported_modules(path)} for path in package_modules()}
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        if node in done or node not in graph:
            return
        if node in visiting:
            cycles.append(" -> ".join(trail[trail.index(node):] + [node]))
            return
        visiting.add(node)
        for target in graph[node]:
            if target != node.rsplit(".", 1)[0]:  # a module importing its own package's __init__
                visit(target, trail + [node])
        visiting.discard(node)
        done.add(node)

    for module in graph:
        visit(module, [])
    # the kept paths import their stage's module, which is how they exist: not a cycle of code
    real = [c for c in cycles if not any(f"cachetrain.{kept} " in c + " " for kept in ENTRY_MODULES)]
    assert not real, "import cycles:\n" + "\n".join(real)
