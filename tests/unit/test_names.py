"""One names module (issue 24): every Celery task/queue name and Redis key lives in
`orchestration/names.py`, and nowhere else in orchestration/, workers/ or config/.

Parsed with `ast` (string constants, including the literal parts of f-strings), so a key written
as `"callflow:..."` or a task name written as `"callflow.<task>"` anywhere outside names.py fails.
Logger names (`"callflow.lifecycle"`) and messages (`"callflow: configuration error"`) are neither.
The registered tasks are read from the Celery app in a child process (importing `workers.app`
configures logging and settings, which the other unit tests should not inherit).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from orchestration import names

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("orchestration", "workers", "config")
NAMES_PY = ROOT / "orchestration" / "names.py"
KEY_LITERAL = re.compile(r"^callflow:\S")


def _modules():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts and path != NAMES_PY:
                yield path


def _hits(source: str) -> list[tuple[int, str]]:
    """(line, value) of every key or task-name literal, and every literal `name=` of a `.task(...)`."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if KEY_LITERAL.match(node.value) or node.value in names.TASKS:
                hits.append((node.lineno, node.value))
        # A task registered under a literal name (a new task must get its name in names.py).
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "task":
            hits += [(node.lineno, f"task name {kw.value.value!r}") for kw in node.keywords
                     if kw.arg == "name" and isinstance(kw.value, ast.Constant)]
    return hits


def test_no_key_or_task_literal_outside_names():
    offences = [f"{path.relative_to(ROOT)}:{line}: {value!r}"
                for path in _modules() for line, value in _hits(path.read_text())]
    assert not offences, "use orchestration.names instead of:\n" + "\n".join(offences)


def test_the_check_sees_a_literal():
    source = 'K = f"callflow:push:lease:{1}"\nT = "callflow.sweep"\n@app.task(name="callflow.new")\ndef f(): ...\n'
    assert sorted(line for line, _ in _hits(source)) == [1, 2, 3]
    assert _hits('log = get_logger("callflow.lifecycle")\nprint("callflow: configuration error")\n') == []


def test_names_imports_nothing_of_callflow():
    tree = ast.parse(NAMES_PY.read_text())
    imported = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imported)


_LIST_TASKS = """
import json
from workers.app import app
app.loader.import_default_modules()
import workers.tasks  # noqa: F401
print(json.dumps({
    "tasks": sorted(t for t in app.tasks if not t.startswith("celery.")),
    "routes": sorted(app.conf.task_routes),
    "beat": sorted(entry["task"] for entry in app.conf.beat_schedule.values()),
    "queues": [q.name for q in app.conf.task_queues],
}))
"""


def test_every_registered_task_is_named_in_names():
    out = subprocess.run([sys.executable, "-c", _LIST_TASKS], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["tasks"], "no task registered"
    assert set(seen["tasks"]) == set(names.TASKS)
    assert set(seen["routes"]) <= set(names.TASKS)
    assert set(seen["beat"]) <= set(names.TASKS)
    assert set(seen["queues"]) == {names.Q_TIMERS, names.Q_EVENTS, names.Q_SWEEPS, names.Q_PUSH,
                                   names.Q_NOTIFICATIONS}
    assert all(t.startswith(names.TASK_PREFIX) for t in names.TASKS)
