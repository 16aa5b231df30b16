"""Imports run one way, down the data path (DESIGN.md, "Which part may know which").

Every ``import`` of every module of the package is read from its source (``ast``; the
imports inside functions too, which load later but tie the modules all the same) and
checked: no cycle between modules, and no module importing one of a higher layer. The
layers, lowest first (a module may import its own layer and those below it):

    base        errors, file I/O, version, the hub and launcher helpers, progress bars,
                output folders, experiment trackers
    ops         the fused op and its backends
    data        manifest -> audio -> codec -> shards -> batches
    models      the MusicGen adapter, load/save, the condition cache, request records
    methods     a batch -> targets and signed row weights
    metrics     token NLL, membership inference, CLAP, FAD, reports (no training): the
                engine's stop rule measures with them, so they sit below it
    planner     the shape of a step and its memory (imports none of the above; the
                engine lays its steps out with the planner's ``StepShape``)
    engine      the training loop, DeepSpeed, checkpoints, the stop rule
    evaluation  ``evaluate``, its config and the relearning probe (which trains through
                the engine)
    faces       the demo, the CLI and its commands, the package's public API
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "noencore"

BASE = ("noencore.errors", "noencore.fileio", "noencore.version", "noencore.hfhub",
        "noencore.thirdparty", "noencore.distributed", "noencore.progress", "noencore.outputs",
        "noencore.trackers")
EVALUATION = ("noencore.evaluation.evaluate", "noencore.evaluation.relearn",
              "noencore.evaluation.config")
# (layer, module prefixes), lowest first; the first match of the longest prefix wins
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", BASE),
    ("ops", ("noencore.ops", "noencore.kernels")),
    ("data", ("noencore.data",)),
    ("models", ("noencore.models",)),
    ("methods", ("noencore.methods",)),
    ("metrics", ("noencore.evaluation",)),
    ("planner", ("noencore.planner",)),
    ("engine", ("noencore.engine",)),
    ("evaluation", EVALUATION),
    ("faces", ("noencore.demo", "noencore.commands", "noencore.cli", "noencore.__main__",
               "noencore.api", "noencore")),
]


def modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports (``from a import b`` counts as
    module ``a.b`` where that is one, else as ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer index)
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    assert best[1] >= 0, f"{module}: in no layer; add it to LAYERS"
    return best[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer(name)


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_no_import_back_up_the_data_path() -> None:
    names = [n for n, _ in LAYERS]
    upward = sorted(f"{a} ({names[layer(a)]}) -> {b} ({names[layer(b)]})"
                    for a, targets in graph().items() for b in targets if layer(b) > layer(a))
    assert upward == []


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: an import inside a function and a relative one both count."""
    pkg = tmp_path / "noencore"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from noencore.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import a\nfrom .. import sub\n")
    known = {"noencore": pkg / "__init__.py", "noencore.sub": pkg / "sub" / "__init__.py",
             "noencore.sub.a": pkg / "sub" / "a.py", "noencore.sub.b": pkg / "sub" / "b.py"}
    edges = {n: imported(n, p, known) for n, p in known.items()}
    assert edges["noencore.sub.a"] == {"noencore.sub.b"}
    assert edges["noencore.sub.b"] == {"noencore.sub.a", "noencore.sub"}
    assert cycles(edges) == [["noencore.sub.a", "noencore.sub.b"]]
