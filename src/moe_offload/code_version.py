"""A version of the code behind each workflow step, so that a code change reruns what it affects.

The rules' scripts are three-line trampolines into this package, so Snakemake's own code trigger never
sees the code that matters. A step's version is a hash of its function in steps.py and of every package
module it imports, directly or through others, each taken as its syntax tree without docstrings: a
changed comment, docstring or line number changes nothing; a changed statement reruns that step and
what follows. The granularity is the module: a change anywhere in a module reruns every step using it.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
NAME = PACKAGE.name
STEPS = f"{NAME}.steps"


@cache
def _tree(root: Path, module: str) -> ast.Module:
    return ast.parse(_path(root, module).read_text())


def _path(root: Path, module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    return root / rel / "__init__.py" if (root / rel).is_dir() else root / rel.with_suffix(".py")


def _imports(root: Path, node: ast.AST, module: str) -> set[str]:
    """Package modules imported anywhere under `node` (also inside functions: steps import lazily)."""
    package = module if _path(root, module).name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom):
            if sub.level:
                base = package.rsplit(".", sub.level - 1)[0] if sub.level > 1 else package
                target = f"{base}.{sub.module}" if sub.module else base
            else:
                target = sub.module or ""
            names = [f"{target}.{alias.name}" for alias in sub.names]
        elif isinstance(sub, ast.Import):
            target, names = "", [alias.name for alias in sub.names]
        else:
            continue
        for name in [target, *names]:
            if (name == NAME or name.startswith(NAME + ".")) and _path(root, name).is_file():
                found.add(name)
    return found


def _without_docstrings(tree: ast.AST) -> str:
    tree = ast.parse(ast.unparse(tree))  # a copy
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _step(root: Path, step: str) -> ast.FunctionDef:
    for node in _tree(root, STEPS).body:
        if isinstance(node, ast.FunctionDef) and node.name == step:
            return node
    raise KeyError(f"{STEPS} has no step {step!r}")


def modules_of(step: str, root: Path = PACKAGE) -> list[str]:
    """The package modules that steps.<step> runs, transitively (steps.py itself is counted by the
    function alone, so editing one step does not rerun the others)."""
    module_level = [n for n in _tree(root, STEPS).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    todo = _imports(root, _step(root, step), STEPS).union(*(_imports(root, n, STEPS) for n in module_level))
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in seen and module != STEPS:
            seen.add(module)
            todo |= _imports(root, _tree(root, module), module)
    return sorted(seen)


def code_version(step: str, root: Path = PACKAGE) -> str:
    """A short hash of steps.<step> and the modules it runs; equal whenever their code is. `root`: the
    package's folder (another copy of it, in tests)."""
    digest = hashlib.sha256(_without_docstrings(_step(root, step)).encode())
    for module in modules_of(step, root):
        digest.update(module.encode() + b"\0" + _without_docstrings(_tree(root, module)).encode())
    return digest.hexdigest()[:16]
