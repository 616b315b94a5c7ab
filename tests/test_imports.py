"""The package's import graph, counting imports inside functions too: no cycle, and imports flow one way.

Rules: the notebook API names `ablate` / `evaluate` are plain functions (no module made callable, no
`_callable`); the training loop does not import the `evaluate` command (`evaluation`: the metrics it
shares live in `rollout`); rollout engines import no model backend (shared checks live in the leaf
`checks`), except the vLLM engine's one QLoRA helper, which samples the trainer's NF4 base dequantized."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fipo_lite"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(names: dict[tuple[str, str], set[str]] | None = None) -> dict[str, set[str]]:
    """module -> the fipo_lite modules it names in any import statement (an edge per statement;
    `import a.b` counts a.b, not the package a's __init__). With `names`, also fills
    (module, imported module) -> the names a `from ... import` takes from it."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
                if names is not None and base in modules:
                    names.setdefault((mod, base), set()).update(a.name for a in node.names if f"{base}.{a.name}" not in modules)
            else:
                continue
            graph[mod].update(t for t in targets if t in modules and t != mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "fipo_lite.tiny" in graph["fipo_lite.checks"]  # the graph sees function-level imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_callable_module_trick():
    graph = import_graph()
    assert not [m for m in graph if m.rsplit(".", 1)[-1] == "_callable"]
    assert not {"fipo_lite.ablate", "fipo_lite.evaluate", "fipo_lite.export"} & set(graph)  # API names, not modules


def test_the_loop_does_not_import_the_evaluate_command():
    graph = import_graph()
    assert "fipo_lite.evaluation" not in graph["fipo_lite.trainer"]
    assert "fipo_lite.rollout" in graph["fipo_lite.trainer"] and "fipo_lite.rollout" in graph["fipo_lite.evaluation"]


def test_engines_do_not_import_backends():
    names: dict[tuple[str, str], set[str]] = {}
    graph = import_graph(names)
    engines = [m for m in graph if m == "fipo_lite.engines" or m.startswith("fipo_lite.engines.")]
    edges = sorted((m, n) for m in engines for n in graph[m] if n == "fipo_lite.backends" or n.startswith("fipo_lite.backends."))
    # the one exception: a QLoRA trainer's NF4 base, dequantized for vLLM (needs the bitsandbytes model)
    assert edges == [("fipo_lite.engines.vllm", "fipo_lite.backends.bnb4")]
    assert names[("fipo_lite.engines.vllm", "fipo_lite.backends.bnb4")] == {"dequantized_base", "has_4bit_layers"}
    assert "fipo_lite.checks" in graph["fipo_lite.engines.vllm"]


def test_checks_is_a_leaf():
    graph = import_graph()
    # only the tiny model's builder and the GGUF converter, imported when model.path asks for them
    assert graph["fipo_lite.checks"] <= {"fipo_lite.errors", "fipo_lite.tiny", "fipo_lite.gguf_models"}
    for m in ("fipo_lite.backends.hf", "fipo_lite.backends.bnb4", "fipo_lite.backends.unsloth"):
        assert "fipo_lite.checks" in graph[m]


if __name__ == "__main__":
    print(find_cycle(import_graph()))
