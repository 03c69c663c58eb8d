"""The import graph of foe_train and launch, read from the source (ast): imports only go
downwards through the layers of docs/architecture.md, and no module imports itself back
through others. Entry points (``__main__`` modules, the CLIs) sit on top and compose."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module belongs to the first layer with a prefix of its name
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("foe_train.arguments", "foe_train.config", "foe_train.runtime", "foe_train.compat",
              "foe_train.budget", "launch.torchrun", "launch.netns", "launch.agent")),
    ("topology", ("foe_train.topology",)),
    ("model", ("foe_train.model",)),
    ("data", ("foe_train.data",)),
    ("checkpoint", ("foe_train.checkpoint",)),
    ("train/infer", ("foe_train.train", "foe_train.infer")),
    ("bench/eval", ("foe_train.bench", "foe_train.evaluate", "foe_train.report",
                    "launch.cluster", "launch.slurm")),
    ("entry", ("foe_train.cli", "foe_train.study", "launch.cli")),
]
# packages of one layer that must not import each other (both build on the layers below)
SIBLINGS = ("foe_train.train", "foe_train.infer")


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("foe_train", "launch"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of ours that ``name`` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _layer(name: str) -> int:
    if name.endswith("__main__"):
        return len(LAYERS) - 1
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name}: in no layer of tests/test_architecture.py; add it")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # a package's __init__ is imported by every import of its members: not an edge of theirs
    return {name: {t for t in _imports(path, name, known) if not name.startswith(t + ".")}
            for name, path in modules.items()}


def test_imports_only_go_down():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in _graph().items() for b in sorted(targets)
              if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_training_and_inference_are_independent():
    def side(name: str) -> str | None:
        return next((p for p in SIBLINGS if name == p or name.startswith(p + ".")), None)

    crossing = [f"{a} imports {b}" for a, targets in _graph().items() for b in sorted(targets)
                if side(a) and side(b) and side(a) != side(b)]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_a_planted_upward_import_is_caught(tmp_path):
    """The reader sees imports inside functions too (the way circles usually hide)."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from foe_train.cli import bench_main\n")
    found = _imports(path, "foe_train.model.mod", {"foe_train.cli", "foe_train.model.mod"})
    assert found == {"foe_train.cli"} and _layer("foe_train.cli") > _layer("foe_train.model.x")
