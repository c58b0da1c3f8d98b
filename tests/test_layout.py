"""The package's layout: modules import each other without cycles and only through public names.

A module longer than :data:`LONG_MODULE` lines says at the top why it is one module.

Both read the source (``ast``), lazy imports inside functions included: a cycle broken by a lazy
import is still a cycle for whoever reads the code, and a private name imported elsewhere is an
interface nobody declared.
"""

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "excitation"
#: Above this many lines a module is split, or its docstring gives the reason it is not.
LONG_MODULE = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[Tuple[int, str, List[str]]]:
    """(line, absolute module, imported names) of every ``from ... import`` of the package in ``path``."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "excitation" or module.startswith("excitation."):
                yield node.lineno, module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("excitation."):
                    yield node.lineno, alias.name, []


def _modules() -> Dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, module, names in _imports(path):
            # "from .pkg import mod" names a module; "from .mod import f" names the module itself.
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _is_package_face(module: str) -> bool:
    """``excitation`` and its subpackages' ``__init__``: importing from them is importing the public surface."""
    return (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").exists() if module != "excitation" else True


def test_no_import_cycles_between_modules():
    # A package's __init__ re-exports its modules, so an edge into a package face is not a module cycle.
    graph = {name: {t for t in targets if not _is_package_face(t)} for name, targets in _graph().items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_names_imported_across_modules():
    hits = [f"{path.relative_to(ROOT)}:{line}: from {module} import {name}"
            for path in sorted(PACKAGE.rglob("*.py")) for line, module, names in _imports(path)
            for name in names if name.startswith("_") and not name.startswith("__")]
    assert hits == []


def test_a_long_module_says_why_it_is_one_module():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > LONG_MODULE and "Why one module:" not in (ast.get_docstring(ast.parse(text)) or ""):
            missing.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert missing == [], "split these modules or say at the top why each is one: " + ", ".join(missing)
