"""The harness's modules import each other without a cycle, lazy imports inside functions included
(TYPE_CHECKING-only imports are types, not imports at run time)."""
import ast
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "harness"


def harness_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        out |= {n.split(".")[1] for n in names if n.startswith("harness.")}
    return out


def test_harness_import_graph_has_no_cycle():
    graph = {p.stem: harness_imports(p) for p in HARNESS.glob("*.py")}
    assert graph["config"] <= {"memory", "traces"} and "config" not in graph["memory"] | graph["workload"] | graph["traces"]
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph.get(node, ()):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
