"""A version of the code behind each workflow step, so that a code change reruns what it affects.

The rules' scripts are three-line trampolines into this package, so Snakemake's own code trigger never
sees the code that matters. A step's version is a hash of what it runs, each part taken as its syntax tree
without docstrings (a changed comment, docstring or line number changes nothing; a changed statement
reruns that step and what follows):
- in steps.py, by name: the step's function and the top-level definitions it refers to, transitively
  (helpers, constants, imported names), so that editing one step or a helper it does not call reruns
  nothing else;
- in the rest of the package, by module: every module those import, directly or through others. A change
  anywhere in a module reruns every step using it, so code two stages share lives in small modules of its
  own (atomic, hashing, errors), not in one stage's module that the other imports for one helper.
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


def _definitions(root: Path) -> dict[str, ast.stmt]:
    """steps.py's top-level statements by the names they bind (functions, classes, assignments, imports)."""
    found: dict[str, ast.stmt] = {}
    for node in _tree(root, STEPS).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                found[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        found[sub.id] = node
    return found


def _reached(root: Path, step: str) -> list[ast.stmt]:
    """steps.<step> and the top-level statements of steps.py it refers to by name, transitively, in file
    order. A local name that shadows a top-level one only adds to the set (never misses a dependency)."""
    definitions = _definitions(root)
    if not isinstance(definitions.get(step), ast.FunctionDef):
        raise KeyError(f"{STEPS} has no step {step!r}")
    todo, seen = [definitions[step]], []
    while todo:
        node = todo.pop()
        if any(node is s for s in seen):
            continue
        seen.append(node)
        names = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}
        todo += [definitions[name] for name in names if name in definitions]
    order = {id(node): i for i, node in enumerate(_tree(root, STEPS).body)}
    return sorted(seen, key=lambda node: order[id(node)])


def modules_of(step: str, root: Path = PACKAGE) -> list[str]:
    """The package modules that steps.<step> runs, transitively (steps.py itself is counted by what the
    step reaches in it, so editing one step does not rerun the others)."""
    todo = set().union(*(_imports(root, node, STEPS) for node in _reached(root, step)))
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in seen and module != STEPS:
            seen.add(module)
            todo |= _imports(root, _tree(root, module), module)
    return sorted(seen)


def code_version(step: str, root: Path = PACKAGE) -> str:
    """A short hash of what steps.<step> reaches in steps.py and of the modules it runs; equal whenever
    their code is. `root`: the package's folder (another copy of it, in tests)."""
    digest = hashlib.sha256()
    for node in _reached(root, step):
        digest.update(_without_docstrings(node).encode() + b"\0")
    for module in modules_of(step, root):
        digest.update(module.encode() + b"\0" + _without_docstrings(_tree(root, module)).encode())
    return digest.hexdigest()[:16]
