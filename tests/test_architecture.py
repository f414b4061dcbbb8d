"""The stage contract, read from the source's import statements (no import is executed).

The package is cut into stages: ``extract`` runs the model and writes the
activation cache, ``fit`` reads only the cache, ``analysis`` reads what both
wrote.  These tests fail when a change crosses those lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "needleprobe"
SUBPACKAGES = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, anywhere in the file (function-level imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # ``from . import x`` may name a module
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "needleprobe" and parts[1] in SUBPACKAGES else None


def _crossings(graph: dict[str, set[str]], src: str, forbidden) -> list[str]:
    return sorted(f"{m} imports {t}" for m, ts in graph.items() if _stage(m) == src for t in ts if forbidden(t))


def test_the_stages_are_subpackages():
    assert {"io", "run", "data", "model", "extract", "cache", "fit", "analysis"} <= set(SUBPACKAGES)


def test_fit_imports_neither_transformers_nor_the_extract_stage():
    """Fitting reads the cache, never the model: it must run where transformers is not installed."""
    bad = _crossings(_graph(), "fit", lambda t: t.split(".")[0] == "transformers" or _stage(t) in ("extract", "model"))
    assert bad == []


def test_extract_does_not_import_the_analysis_layer():
    assert _crossings(_graph(), "extract", lambda t: _stage(t) == "analysis") == []


def test_only_the_command_line_imports_the_run_time_monitor():
    """``deploy`` (a probe used as a monitor on new text) builds on every stage; no stage may need it."""
    assert [c for s in SUBPACKAGES if s != "deploy" for c in _crossings(_graph(), s, lambda t: _stage(t) == "deploy")] == []


def test_no_import_cycle_between_subpackages():
    edges: dict[str, set[str]] = {s: set() for s in SUBPACKAGES}
    for m, ts in _graph().items():
        a = _stage(m)
        edges.setdefault(a, set()).update(b for t in ts if (b := _stage(t)) not in (None, a))
    edges.pop(None, None)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [" -> ".join(c) for s in SUBPACKAGES if (c := cycle_from(s))]
    assert cycles == []


def test_the_checker_sees_a_crossing():
    """The graph is read from the files, relative imports included (so the tests above can fail)."""
    graph = _graph()
    assert "needleprobe.fit.probe" in graph["needleprobe.fit.fit"]
    assert any(_stage(t) == "cache" for t in graph["needleprobe.extract.extract"])


def test_probe_file_names_are_built_and_parsed_in_one_place():
    """``run/layout.py`` joins the run's paths and parses probe file names; every reader asks it (or a ``Run``)."""
    import re

    pattern = re.compile(r"""glob\(\s*f?["']probe_layer|f["'][^"']*probe_layer_\{""")
    where = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if pattern.search(p.read_text()))
    assert where == ["run/layout.py"]


def test_one_place_builds_batch_plans():
    """extract, its repair and the monitor all batch documents through ``extract.batching.batch_plan``."""
    callers = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "plan_batches(" in p.read_text().replace(
        "def plan_batches(", ""))
    assert callers == ["extract/batching.py"]


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8
LONG_ALLOWED = {
    # name: why it stays long (each to be cut into named steps when next touched)
    "needleprobe.extract.extract._extract": "the extract command's ordered steps (checks, locks, writers, streams, commit)",
    "needleprobe.fit.lbfgs._line_search": "one strong-Wolfe search over all columns; its bits are the fit's bits",
    "needleprobe.fit.lbfgs._lbfgs_columns": "one L-BFGS loop (direction, search, retry, update); bits as above",
}
WIDE_ALLOWED = {
    "needleprobe.fit.streaming.LayerRows.__init__": "keyword-only layout of one row source (plan, standardiser, device)",
    "needleprobe.analysis.report.charts.Plot.__init__": "a chart's axes and labels, all keyword arguments",
    "needleprobe.fit.probe.LinearProbe.fit_path": "public API beside scikit-learn's fit (data, grid, weights, solver knobs)",
}


def _functions():
    """(qualified name, lines, parameters) of every function and method in the package."""
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = child.args
                    params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                    yield f"{prefix}.{child.name}", child.end_lineno - child.lineno + 1, len(params)
                    yield from walk(child, f"{prefix}.{child.name}")
                elif isinstance(child, ast.ClassDef):
                    yield from walk(child, f"{prefix}.{child.name}")

        yield from walk(ast.parse(path.read_text(), str(path)), mod)


def test_no_module_is_too_long_to_read():
    long = {_module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_long_functions_and_long_signatures_say_why():
    """A function over 80 lines or 8 parameters is listed above with its reason; the lists hold no stale entry."""
    fns = list(_functions())
    long = {name for name, n, _ in fns if n > MAX_FUNCTION_LINES}
    wide = {name for name, _, k in fns if k > MAX_PARAMETERS}
    assert long - set(LONG_ALLOWED) == set()
    assert wide - set(WIDE_ALLOWED) == set()
    assert set(LONG_ALLOWED) - long == set() and set(WIDE_ALLOWED) - wide == set()


def test_one_place_forwards_documents_through_the_hooks():
    """extract, its repair, the monitor and ``Monitor.score`` run documents through ``extract.runner.forwarding``;
    only the watch hooks a model itself (it scores the forwards of the user's own ``generate``)."""
    def callers(call: str) -> list[str]:
        return sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if call in p.read_text())

    assert callers("capture_sites(") == ["deploy/watch.py", "extract/runner.py", "extract/sites.py"]
    assert callers(" Forward(") == ["extract/runner.py"]
