"""The task data shipped in data/tasks (IOI pairs, facts, induction prompts, concept sentences): one reader."""
from __future__ import annotations

import functools
import json

from .models import DATA_DIR

TASKS_DIR = DATA_DIR / "tasks"


@functools.lru_cache(maxsize=8)
def _rows(name: str) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in (TASKS_DIR / f"{name}.jsonl").read_text().splitlines())


def task_rows(name: str) -> list[dict]:
    """The rows of a shipped task file (copies: callers may change them)."""
    return [dict(r) for r in _rows(name)]


def task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.jsonl"))
