"""The layout's arrows (issue 24): which of callflow's packages may import which, and no cycles.

    workers/        the processes (web, listener, Celery tasks, the `callflow` command): parse, call
    orchestration/  everything they call: domain, lifecycle, ports, adapters, ops ...
    config/         settings and logging
    devstack/       what tests and benches share: starting Redis, Postgres, LiveKit, callflow's
                    processes, and the stand-ins for hosted services (never shipped)
    bench/, tests/  the benchmarks and the tests

Arrows point inwards only: `workers` may import `orchestration` and `config`, never the other way;
`bench` and `tests` may import all of those and `devstack`, but not each other's (`tests` may not
import `bench`, `bench` may not import `tests`); `devstack` imports neither. Within `orchestration`,
the ports (`orchestration.ports`) and the domain import nothing but the domain: a port is not typed
in a use case's or an adapter's classes.

Every module is parsed with `ast`; nothing is imported, so this runs in milliseconds and finds an
import however deep it sits. Which imports count: every `import` and `from ... import` statement
anywhere in a module, at top level, inside a function, under `if TYPE_CHECKING:` or in a `try:`.
A function-level import is still an arrow: it only moves the import from load time to call time
(which is how a cycle is usually hidden, not removed), and the code depends on the module all the
same. A `TYPE_CHECKING` import is an arrow of the types, which is the port-on-use-case dependency
this test is meant to catch. Not counted: modules named in strings (Celery's `include=`, a
`python -m workers.listener` command line), since those are processes started, not code imported.

Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so it is an arrow to those
packages too, except to the importer's own enclosing packages (a submodule importing a sibling
while its package's `__init__` re-exports it is how packages work, not a cycle).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {"__pycache__", "node_modules", ".venv"}


@dataclass(frozen=True)
class Arrow:
    source: str
    target: str
    line: int
    implied: bool = False  # a package `target`'s `__init__` that importing a module inside it runs

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({_path_of(self.source)}:{self.line})"


def _packages() -> list[str]:
    """callflow's top-level packages: the folders beside pyproject.toml with an `__init__.py`."""
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in _packages():
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if SKIP_DIRS & set(rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _path_of(module: str) -> str:
    return str(MODULES[module].relative_to(ROOT))


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _known(name: str) -> str | None:
    """The deepest of callflow's modules `name` names (a package, or a module in it), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of callflow's that one import statement names."""
    if isinstance(node, ast.Import):
        return [m for alias in node.names if (m := _known(alias.name))]
    if node.level:  # relative: from the importer's package (a module's package is its parent)
        package = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = []
    for alias in node.names:
        # `from a.b import c` imports the module a.b.c when there is one, else the name c of a.b.
        target = _known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _known(base)
        if target:
            found.append(target)
    return found


def _arrows() -> list[Arrow]:
    arrows: dict[Arrow, None] = {}  # ordered, without repeats
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own = {".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 2)}
        for node in ast.walk(tree):  # every statement, at any depth: see the docstring
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(module, node):
                parts = target.split(".")
                for end in range(1, len(parts) + 1):  # the target and the packages it runs first
                    step = ".".join(parts[:end])
                    if step in MODULES and step not in own:
                        arrows[Arrow(module, step, node.lineno, implied=step != target)] = None
    return list(arrows)


ARROWS = _arrows()


def _cycles(arrows: list[Arrow]) -> list[list[Arrow]]:
    """One cycle through each strongly connected group of modules (Tarjan), as its arrows."""
    graph: dict[str, dict[str, Arrow]] = defaultdict(dict)
    for a in arrows:
        graph[a.source].setdefault(a.target, a)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth is bounded by the import chain's length
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(group)

    for v in sorted(MODULES):
        if v not in index:
            connect(v)

    cycles = []
    for group in groups:
        members = set(group)
        start = min(group)
        # breadth-first from start back to start, within the group: a shortest cycle through it
        paths: dict[str, list[Arrow]] = {start: []}
        queue = [start]
        found = None
        while queue and found is None:
            v = queue.pop(0)
            for w, a in sorted(graph[v].items()):
                if w == start:
                    found = paths[v] + [a]
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [a]
                    queue.append(w)
        cycles.append(found or [])
    return cycles


def _top(module: str) -> str:
    return module.split(".")[0]


def _crossing(sources: set[str], forbidden: set[str]) -> list[str]:
    # The implied arrows to a target's packages cross wherever the target does: not listed twice.
    return [str(a) for a in ARROWS
            if not a.implied and _top(a.source) in sources and _top(a.target) in forbidden]


def test_the_parse_sees_the_layout() -> None:
    # Guards the other tests against passing on nothing: the packages are found, and arrows that
    # are meant to be there (at top level, inside a function, `from package import module`, and
    # the package a submodule's import runs first) are seen.
    assert {"config", "orchestration", "workers", "bench", "tests"} <= set(_packages())
    assert len(MODULES) > 100
    pairs = {(a.source, a.target) for a in ARROWS}
    assert ("workers.app", "config.settings") in pairs
    assert ("workers.app", "orchestration.db") in pairs  # inside _close_pools
    assert ("workers.web.health", "orchestration.ops.queues") in pairs  # from orchestration.ops import queues
    assert ("workers.web.health", "orchestration.ops") in pairs
    assert ("orchestration.lifecycle.sweep", "orchestration.lifecycle.room_actions") in pairs


def test_no_import_cycles() -> None:
    cycles = _cycles(ARROWS)
    assert not cycles, "import cycles:\n" + "\n\n".join("\n".join(f"  {a}" for a in c) for c in cycles)


def test_orchestration_and_config_import_no_process_bench_or_test_code() -> None:
    wrong = _crossing({"orchestration", "config"}, {"workers", "bench", "tests", "devstack"})
    assert not wrong, "inner code importing outer layers:\n" + "\n".join(wrong)


def test_ports_and_domain_depend_on_the_domain_only() -> None:
    # A port says what the use cases need in the domain's words; neither it nor the domain may
    # lean on a use case's (or an adapter's) internals. Type-only imports count (see above).
    wrong = [str(a) for a in ARROWS
             if not a.implied and (a.source == "orchestration.ports" or a.source.startswith("orchestration.domain"))
             and _top(a.target) in {"orchestration", "workers", "config", "bench", "tests", "devstack"}
             and not (a.target == "orchestration" or a.target.startswith("orchestration.domain"))]
    assert not wrong, "ports or domain importing more than the domain:\n" + "\n".join(wrong)


def test_workers_import_no_bench_or_test_code() -> None:
    wrong = _crossing({"workers"}, {"bench", "tests", "devstack"})
    assert not wrong, "processes importing benches or tests:\n" + "\n".join(wrong)


def test_bench_and_tests_do_not_import_each_other() -> None:
    wrong = _crossing({"bench"}, {"tests"}) + _crossing({"tests"}, {"bench"})
    assert not wrong, "bench and tests importing each other (shared code belongs in devstack/):\n" + "\n".join(wrong)


def test_devstack_imports_no_bench_or_test_code() -> None:
    wrong = _crossing({"devstack"}, {"bench", "tests"})
    assert not wrong, "devstack importing what it serves:\n" + "\n".join(wrong)


def test_adapters_import_no_use_case() -> None:
    # An adapter implements a port; what it shares with a use case (a timer bucket's width, say)
    # lives in the domain or `orchestration.names`, not in the use case's module.
    wrong = [str(a) for a in ARROWS
             if not a.implied and a.source.startswith("orchestration.adapters.")
             and a.target.startswith("orchestration.lifecycle")]
    assert not wrong, "adapters importing use cases:\n" + "\n".join(wrong)


def test_the_task_base_and_the_outcome_handlers_import_no_app_tasks_or_clients() -> None:
    # `workers.app` imports `workers.task_outcomes` (its signal handlers) and may take
    # `workers.base_task.CallflowTask` as its tasks' base; `workers.clients` imports the app. So
    # neither of the two may import the app, the tasks or the clients back (not even lazily).
    downstream = {"workers.app", "workers.clients", "workers.tasks"}
    wrong = [str(a) for a in ARROWS
             if a.source in ("workers.base_task", "workers.task_outcomes", "workers.transient")
             and (a.target in downstream or a.target.startswith("workers.tasks."))]
    assert not wrong, "the task base or the outcome handlers importing what imports them:\n" + "\n".join(wrong)
    pairs = {(a.source, a.target) for a in ARROWS}
    assert ("workers.clients", "workers.app") in pairs  # the guard above is about a real arrow
    assert ("workers.tasks.lifecycle", "workers.base_task") in pairs
