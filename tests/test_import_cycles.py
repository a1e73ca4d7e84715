"""The harness's import graph has no cycles (issue #9: gate.py and report.py imported each other). Read from the
source with ast, so imports inside functions and under TYPE_CHECKING count too: a cycle hidden in a function is
still two modules that cannot be understood one without the other."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "engine", "reference")


def module_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports. `from pkg import name` points at pkg.name when that is a module
    (importing a sibling through its package is not a use of the package's own code), else at pkg."""
    files = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                subs = {f"{base}.{a.name}" for a in node.names} & set(files)
                deps |= subs or {base}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_harness_and_reference_import_graph_is_acyclic():
    assert cycles(module_graph(REPO, ("harness", "reference"))) == []


def test_engine_import_graph_is_acyclic_but_for_its_door():
    """engine/api.py is the door: its functions import the family registry and the runner on call, and the family
    pipelines import RunConfig/Artifacts from it, so {api, families, pipelines, runner} is one component by design
    (RunConfig resolves each family's sampling type through the registry). Anything else joining it is a cycle."""
    door = {"engine.api", "engine.families", "engine.runner"}
    for component in cycles(module_graph(REPO, ("engine",))):
        extra = [m for m in component if m not in door and not m.startswith("engine.pipelines.")]
        assert not extra, f"engine modules in an import cycle beyond the api door: {extra} (component {component})"


def test_gate_reads_and_judges_without_the_writers():
    graph = module_graph(REPO)
    writers = {"harness.report", "harness.html_report", "harness.junit", "harness.verdict"}
    assert not graph["harness.gate"] & writers, graph["harness.gate"]
    assert not graph["harness.runfiles"] & (writers | {"harness.gate"})


def test_cycle_is_caught_even_inside_a_function_or_type_checking(tmp_path):
    """Plant the old loop (report imports gate under TYPE_CHECKING, gate imports report in a function)."""
    pkg = tmp_path / "harness"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "report.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from harness.gate import GateResult\n")
    (pkg / "gate.py").write_text("def run():\n    from harness.report import write_summary\n")
    (pkg / "zoo").mkdir()
    (pkg / "zoo" / "__init__.py").write_text("from harness.zoo import flux1\n")
    (pkg / "zoo" / "flux1.py").write_text("from . import synth\n")
    (pkg / "zoo" / "synth.py").write_text("")
    assert cycles(module_graph(tmp_path, ("harness",))) == [["harness.gate", "harness.report"]]
