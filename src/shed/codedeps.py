"""Which project code each stage runs, read from the source: dvc.yaml's code deps and the job store's key.

    python -m shed.codedeps            # each stage's code deps, as dvc.yaml lists them

A module's code is itself, every `shed` module it imports (at any depth, including imports inside
functions) and the package data it reads. Package `__init__` files hold no code (a test checks it).
"""

from __future__ import annotations

import ast
import hashlib
import sys
from functools import cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# Data files read at run time rather than imported: the lm-eval task configs (and their utils.py).
PACKAGE_DATA = {"shed.scoring": ["tasks"]}
STAGES = ["prepare", "base", "embed", "cluster", "shapley", "sample", "finetune", "evaluate"]


def module_path(name: str) -> Path:
    parts = name.split(".")[1:]
    package = PACKAGE_DIR.joinpath(*parts)
    return package / "__init__.py" if package.is_dir() else package.with_suffix(".py")


def _is_module(name: str) -> bool:
    return module_path(name).is_file()


@cache
def direct_imports(name: str) -> frozenset[str]:
    """The `shed` modules `name` imports anywhere in its source (package __init__s left out)."""
    found = set()
    for node in ast.walk(ast.parse(module_path(name).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("shed."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("shed"):
            for alias in node.names:  # `from shed import x` / `from shed.stages import x`: x may be a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return frozenset(m for m in found if _is_module(m) and module_path(m).name != "__init__.py")


def closure(name: str) -> list[str]:
    """`name` and every `shed` module it imports, directly or not (sorted)."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(direct_imports(module))
    return sorted(seen)


def code_paths(name: str) -> list[Path]:
    """The source files and package-data folders that make up `name`'s code."""
    paths = [module_path(m) for m in closure(name)]
    paths += [PACKAGE_DIR / d for m in closure(name) for d in PACKAGE_DATA.get(m, [])]
    return sorted(paths)


def stage_deps(stage: str) -> list[str]:
    """A stage's code deps as dvc.yaml lists them: paths relative to the project root (src/shed/...)."""
    return [f"src/shed/{p.relative_to(PACKAGE_DIR).as_posix()}" for p in code_paths(f"shed.stages.{stage}")]


def fingerprint(modules: list[str], exclude: frozenset[str] = frozenset()) -> str:
    """A hash of the code of `modules` (see code_paths) less the modules in `exclude`: any edit changes it."""
    paths = {p for m in modules for p in code_paths(m) if module_name(p) not in exclude}
    files = sorted(f for p in paths for f in ([p] if p.is_file() else
                                              (q for q in p.rglob("*") if q.is_file() and "__pycache__" not in q.parts)))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def module_name(path: Path) -> str:
    return ".".join(["shed", *path.relative_to(PACKAGE_DIR).with_suffix("").parts])


def main() -> None:
    for stage in STAGES:
        print(f"{stage}:")
        for dep in stage_deps(stage):
            print(f"  - {dep}")


if __name__ == "__main__":
    sys.exit(main())
