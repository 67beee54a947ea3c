"""The package's import graph: three floors, arrows only downward, no job importing a job.

Floors (DESIGN.md section 2): jobs (main and the modules it dispatches to, export) ->
the evaluation library and the config tree -> core modules, data, models. Imports within a
floor are allowed; main reaches the jobs by name (importlib), never by an import.
"""

import ast
import pathlib

from e2e import ROOT

from bt_jax import main

PACKAGE = pathlib.Path(ROOT, "bt_jax")
JOBS = {m.removeprefix("bt_jax.") for m in main.JOBS.values()}
TOP_FLOOR = JOBS | {"main", "export"}
MIDDLE_FLOOR = {"defaults", "evaluation"}


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _is_module(name: str) -> bool:
    path = PACKAGE / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _floor(module: str) -> int:
    head = module.split(".")[0]
    return 0 if head in TOP_FLOOR else 1 if head in MIDDLE_FLOOR else 2


def imports() -> dict[str, set[str]]:
    """bt_jax module -> the bt_jax modules it imports (absolute imports, as ours all are)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bt_jax"):
                base = node.module.removeprefix("bt_jax").lstrip(".")
                for alias in node.names:  # a submodule, or a name defined in `base`
                    candidate = f"{base}.{alias.name}".lstrip(".")
                    found.add(candidate if _is_module(candidate) else base)
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("bt_jax.") for a in node.names if "bt_jax." in a.name}
        graph[_module(path)] = {m for m in found if m}
    return graph


def test_jobs_are_modules_of_the_top_floor():
    assert sorted(JOBS) == ["knn_eval", "linear_eval", "pretrain", "semi_supervised", "transfer"]
    assert all((PACKAGE / f"{job}.py").exists() for job in JOBS)


def test_three_floors_arrows_only_downward_no_job_imports_a_job():
    graph = imports()
    assert "evaluation.knn" in graph["pretrain"] and "defaults" in graph["main"]
    upward = [
        f"{src} -> {dst}"
        for src, dsts in graph.items()
        for dst in dsts
        if _floor(dst) < _floor(src) or (dst.split(".")[0] in JOBS and src != dst)
    ]
    assert not upward, upward


def test_at_most_13_top_level_modules():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(modules) <= 13, modules
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == ["data", "evaluation", "models"]
