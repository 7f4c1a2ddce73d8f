"""The package's shape: no import circles, the engine sees tasks only through the task interface, the run
state round-trips through checkpoints, and light modules stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import evo_subens
from evo_subens.core.state import STAGES, RunState

PACKAGE = Path(evo_subens.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, *, lazy: bool = False) -> set[str]:
    """Modules of this package that ``path`` imports when it is imported (not inside functions or
    ``if TYPE_CHECKING:`` blocks); ``lazy``: also those imported inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                continue
            if lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With,
                                          ast.For, ast.While)):
                visit(node.body)
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # "from . import x" may name a submodule
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if _exists(candidate) else target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)

    visit(ast.parse(path.read_text()).body)
    return {name for name in found if name.startswith("evo_subens") and _exists(name)}


def _exists(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph(*, lazy: bool = False) -> dict[str, set[str]]:
    return {_module_name(p): _top_level_imports(p, lazy=lazy) for p in PACKAGE.rglob("*.py")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def test_import_graph_has_no_circles() -> None:
    graph = _graph()
    assert len(graph) > 30 and any(graph.values())  # the parser found the package and its imports
    assert _cycles(graph) == []


def test_imports_inside_functions_close_no_circle_either() -> None:
    """Counting imports made inside functions too, the one circle is the family registry: building a config's
    ``children`` section looks up the chosen family's section class (a plugin lookup by name), and family
    modules build on the config classes."""
    graph = _graph(lazy=True)
    assert "evo_subens.families" in graph["evo_subens.core.config"]  # the lazy lookup is seen
    graph["evo_subens.core.config"].discard("evo_subens.families")
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_engine_imports_no_task_at_module_level() -> None:
    """core/ and families/ reach a task only through tasks.base and the registry in tasks/__init__.py; the run
    config (core/config.py) also composes the config sections tasks declare (``tasks/<task>/config.py``)."""
    allowed = {"evo_subens.tasks", "evo_subens.tasks.base"}
    sections = {f"evo_subens.tasks.{p.parent.name}.config" for p in (PACKAGE / "tasks").glob("*/config.py")}
    for path in [*(PACKAGE / "core").glob("*.py"), *(PACKAGE / "families").glob("*.py")]:
        own = allowed | sections if path.name == "config.py" and path.parent.name == "core" else allowed
        leaks = {m for m in _top_level_imports(path) if m.startswith("evo_subens.tasks") and m not in own}
        assert not leaks, f"{path.relative_to(PACKAGE)} imports {sorted(leaks)}"


def test_modules_stay_small() -> None:
    sizes = {p.relative_to(PACKAGE): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 500, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.slow
@pytest.mark.parametrize("statement", [
    "import evo_subens.tasks.classification.metrics",
    "from evo_subens.core.config import load_config; load_config('configs/default.yaml')",
    "import evo_subens.cli",
])
def test_light_imports_do_not_load_ray_or_evotorch(statement: str) -> None:
    code = f"{statement}\nimport sys\nprint(sorted({{'ray', 'evotorch'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"


def test_run_state_round_trips() -> None:
    state = RunState(stage="finetune", parent_id="0123456789abcdef", search={"generation": 2}, members=[5, 3, 9],
                     tuned=2, decided=0, accepted=[], checks=[{"generation": 0}], grow=None)
    assert RunState.from_dict(dict(state.to_dict(), format=1, seq=7, config={})) == state
    assert state.ensemble == []


def test_run_state_reads_checkpoints_written_before_acceptance() -> None:
    """Checkpoints from before acceptance, checks and selection existed: every member is in the ensemble."""
    old = {"format": 1, "seq": 3, "stage": "done", "config": {}, "parent_id": "ab", "search": {"generation": 1},
           "members": [4, 1], "tuned": 2, "rng": {"torch": None}}
    state = RunState.from_dict(old)
    assert (state.ensemble, state.decided, state.checks, state.rng) == ([0, 1], 0, [], {"torch": None})


def test_run_state_refuses_an_unknown_stage() -> None:
    assert "done" in STAGES
    with pytest.raises(ValueError, match="unknown run stage 'tuning'"):
        RunState(stage="tuning", parent_id="ab")
