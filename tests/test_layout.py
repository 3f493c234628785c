"""The shape of the package: no import cycle between attnpatch's modules, and a compute layer (attnpatch.kernels) that
imports nothing but torch, triton, NumPy and the standard library (ruff's banned imports in attnpatch/kernels/ruff.toml
say the same to an editor)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attnpatch"


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every module of attnpatch."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports_of(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """Every module named by an import statement of `name` (any depth: inside functions and TYPE_CHECKING too),
    resolved to an attnpatch module where it is one, else to its top-level name."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name if alias.name in known else alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: None if is_package else -1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                child = f"{target}.{alias.name}"
                out.add(child if child in known else target if target in known else target.split(".")[0])
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, pkg, known) & known for name, (path, pkg) in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["attnpatch.methods.base"] = graph["attnpatch.methods.base"] | {"attnpatch.api"}
    assert any("attnpatch.api" in c and "attnpatch.methods.base" in c for c in cycles(graph))


def test_compute_layer_imports_only_torch_triton_and_the_standard_library():
    mods = modules()
    known = set(mods)
    allowed = {"torch", "triton", "numpy", "__future__"} | set(sys.stdlib_module_names)
    bad = {}
    for name, (path, is_package) in mods.items():
        if name == "attnpatch.kernels" or name.startswith("attnpatch.kernels."):
            outside = {
                m
                for m in imports_of(name, path, is_package, known)
                if not (m in allowed or m == "attnpatch.kernels" or m.startswith("attnpatch.kernels."))
            }
            if outside:
                bad[name] = sorted(outside)
    assert bad == {}


def test_kernels_lint_rule_bans_transformers_and_upper_layers():
    rules = (PACKAGE / "kernels" / "ruff.toml").read_text()
    assert '"TID251"' in rules and '"transformers".msg' in rules and '"attnpatch.api".msg' in rules


# The layers, bottom up (README "Layout"): a module imports from its own layer or the ones below, never above.
LAYERS = (
    ("kernels", "_version"),  # compute: tensors in, tensors out
    ("methods", "nn"),  # the method contract (methods.base), one file per method, validators
    ("integrations",),  # how attention is reached: the transformers registry, instance forwards, model structure
    (
        "api",
        "profiles",
        "distributed",
        "models",
        "arguments",
    ),  # apply/patched/Patch, profiles, processes, zoo, CLI types
    ("calibrate", "analysis", "eval", "adapters"),  # workflows on patched models
    ("info", "demo", "cli", "__main__", ""),  # entry points and the package's own namespace
)


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(LAYERS) if part in names)


def test_every_module_imports_only_its_own_layer_or_below():
    upward = [
        f"{m} -> {t}"
        for m, targets in sorted(import_graph().items())
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert upward == []


def test_methods_and_integrations_meet_only_in_the_contract():
    """A method's module imports no other method and no integration; an integration imports only methods.base."""
    shared = {"attnpatch.methods.base", "attnpatch.methods.validators"}
    bad = []
    for module, targets in import_graph().items():
        if module.startswith("attnpatch.methods.") and module not in shared:
            bad += [f"{module} -> {t}" for t in targets if t.startswith("attnpatch.methods.") and t not in shared]
        if module.startswith("attnpatch.integrations"):
            bad += [
                f"{module} -> {t}"
                for t in targets
                if t.startswith("attnpatch.methods") and t != "attnpatch.methods.base"
            ]
    assert bad == []
