"""The harness's modules import each other without a cycle, lazy imports inside functions included
(TYPE_CHECKING-only imports are types, not imports at run time); the config schema imports nothing that prices,
runs or probes."""
import ast
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "harness"


def module_name(path: Path) -> str:
    parts = path.relative_to(HARNESS).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def harness_imports(path: Path, modules: set[str]) -> set[str]:
    """The harness modules `path` imports (`from harness.x import y` counts y when y is a module)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness."):
            base = node.module.removeprefix("harness.")
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("harness.") for a in node.names if a.name.startswith("harness.")}
    return out


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in HARNESS.rglob("*.py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): harness_imports(p, modules) - {module_name(p)} for p in paths}


def test_harness_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["config"] <= {"fields", "strategies", "record", "traces"}
    assert not any("config" in graph[m] for m in graph if m == "strategies" or m.startswith("strategies."))
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph.get(node, ()):
            # a package's __init__ importing its own modules is not a cycle through the package
            if node == dep.split(".")[0]:
                continue
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_kind_branches_live_in_the_strategy_specs():
    """No harness module outside harness/strategies/ branches on a strategy's kind."""
    offenders = []
    for path in HARNESS.rglob("*.py"):
        if module_name(path).startswith("strategies"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "kind ==" in line.replace('"kind"] ==', "") and "strategy" in line:
                offenders.append(f"{path.relative_to(HARNESS)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
