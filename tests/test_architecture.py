"""The package's shape, checked: no import cycle (type-only imports included), every name of the
corpus file spelled in one module, environment variables read at entry points only."""

import ast
from pathlib import Path

import spade_faiss

PACKAGE = Path(spade_faiss.__file__).parent
ROOT = "spade_faiss"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, every import statement (type-only too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            for t in targets:
                if t in modules and t != name and t != ROOT:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def layers(graph: dict[str, set[str]]) -> int:
    """The length of the longest import chain (modules that import nothing of the package: 1)."""
    depth = {}

    def d(v):
        if v not in depth:
            depth[v] = 0
            depth[v] = 1 + max((d(w) for w in graph[v]), default=0)
        return depth[v]

    return max(d(v) for v in graph)


def test_the_package_has_no_import_cycle_type_only_imports_included():
    graph = import_graph()
    assert len(graph) > 20 and sum(map(len, graph.values())) > 40  # the graph is really read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layers({"a": {"b"}, "b": set(), "c": {"a"}}) == 3


# Every name in or beside a corpus file: spelled in store/names.py only.
CORPUS_NAMES = ('"images/', '"levels/', '"n_committed"', '"index/faiss"', '"projections', '"leave_one_out_theta"',
                '".appends"', '"thresholds.json"', '".writer.lock"', '".faiss"', '"representations"')


def test_every_name_of_the_corpus_file_is_spelled_in_one_module():
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "names.py" and path.parent.name == "store":
            continue
        text = path.read_text()
        found += [f"{path.relative_to(PACKAGE)}: {n}" for n in CORPUS_NAMES if n in text]
    assert found == []


ENTRY_POINTS = {"apps/cli.py", "apps/allocator.py"}


def test_the_library_reads_environment_variables_at_entry_points_only():
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and rel not in ENTRY_POINTS:
                found.append(f"{rel}:{node.lineno}")
    assert found == []


if __name__ == "__main__":  # the numbers quoted in docs/design.md's module map
    g = import_graph()
    print({"modules": len(g), "layers": layers(g), "edges": sum(map(len, g.values())), "cycles": len(cycles(g))})
