"""The library's layers, read from its source: what may import what.

Layers, lowest first: core (model access, the neuron, fitting, the query encoder, the router, the weight
generator, facts and their probes), model (the edited model, its bundle, generation, evaluation, the
baselines), pipeline (settings, stages, runner, tracking), serve (CLI, HTTP). A module imports its own
layer or lower ones; the imports that still go upward are listed in ``UPWARD`` by name, so the list can
only shrink. No core or model module imports a pipeline or serving package (Kubeflow, MLflow, DVC, FastAPI,
Starlette, uvicorn, boto3) when it is loaded: those are imported inside the functions that use them.
Module-level imports have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "meg"
HEAVY = ("kfp", "mlflow", "dvc", "fastapi", "uvicorn", "starlette", "boto3")

LAYERS = {
    "core": ("meg", "meg.errors", "meg.hashing", "meg.lm", "meg.neuron", "meg.textbatch", "meg.facts",
             "meg.probes", "meg.subject_gate", "meg.augment", "meg.rewrite", "meg.fit", "meg.encoder",
             "meg.router", "meg.generator", "meg.generation", "meg.data", "meg.factstore", "meg.batcher",
             "meg.plots"),
    "model": ("meg.sources", "meg.editor", "meg.answer", "meg.evaluate", "meg.bundle", "meg.api", "meg.editors",
              "meg.benchmark", "meg.report", "meg.sweep", "meg.baselines"),
    "pipeline": ("meg.config", "meg.stages", "meg.runner", "meg.tracking"),
    "serve": ("meg.cli", "meg.cli_model", "meg.chat", "meg.service"),
}
ORDER = ("core", "model", "pipeline", "serve")

# Upward imports that remain (importer -> imported), each inside a function. Remove an entry when it goes.
UPWARD = {
    ("meg.bundle", "meg.tracking"),  # the registry download of a bundle
}


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(name: str, path: Path, module_level: bool) -> set[str]:
    """Absolute names a module imports (``from a import b`` gives ``a`` and ``a.b``); only the statements run
    when it is loaded with ``module_level`` (not those in functions or under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if module_level:
        nodes = []
        for node in tree.body:
            nodes += node.body + node.orelse + [h for x in node.handlers for h in x.body] if isinstance(
                node, ast.Try) else [] if isinstance(node, ast.If) else [node]
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = package.split(".")[: len(package.split(".")) - n.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {base, *(f"{base}.{a.name}" for a in n.names)}
    return out


def layer_of(module: str) -> str:
    best = max(((len(p), layer) for layer, prefixes in LAYERS.items() for p in prefixes
                if module == p or module.startswith(p + ".") and p != "meg"), default=(0, "core" if module == "meg"
                                                                                    else None))
    return best[1]


MODULES = modules()


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) in ("core", "model")))
def test_no_pipeline_or_serving_package_is_imported_at_load(module):
    heavy = sorted(i for i in imports(module, MODULES[module], True) if i.split(".")[0] in HEAVY)
    assert heavy == [], f"{module} imports {heavy} when loaded; import them inside the functions that use them"


def test_no_import_goes_up_a_layer_except_the_listed_ones():
    found = set()
    for m, path in MODULES.items():
        for i in imports(m, path, False):
            if i in MODULES and i != m and ORDER.index(layer_of(i)) > ORDER.index(layer_of(m)):
                found.add((m, i))
    assert found - UPWARD == set(), "a lower layer imports a higher one"
    assert UPWARD - found == set(), "an upward import listed as remaining is gone: take it off UPWARD"


def test_module_level_imports_have_no_cycle():
    edges = {m: {i for i in imports(m, p, True) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path + [m, n]
            if n not in state and (cycle := visit(n, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            assert visit(m, []) is None
