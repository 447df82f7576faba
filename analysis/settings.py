"""Deployment settings, read from the environment (so one app process serves everyone the same way)."""
from __future__ import annotations

import os

TRUE = {"1", "true", "yes", "on"}


def review_mode() -> bool:
    """WORKBENCH_REVIEW_MODE=1: viewers browse stored results and findings; nothing loads a model or computes."""
    return os.environ.get("WORKBENCH_REVIEW_MODE", "").strip().lower() in TRUE


def allow_remote_code() -> bool:
    """WORKBENCH_ALLOW_REMOTE_CODE=1 shows the trust_remote_code switch in the app (off by default)."""
    return os.environ.get("WORKBENCH_ALLOW_REMOTE_CODE", "").strip().lower() in TRUE


def allow_local_folders() -> bool:
    """WORKBENCH_ALLOW_LOCAL_FOLDERS=0 stops the app (and so any link) from loading arbitrary server folders."""
    return os.environ.get("WORKBENCH_ALLOW_LOCAL_FOLDERS", "1").strip().lower() in TRUE


def max_run_seconds() -> float:
    """WORKBENCH_MAX_RUN_SECONDS (default 600; 0: no limit): the app refuses a run whose estimate, with the runs it
    builds on, is longer, so one request cannot hold a model for everyone (the CLI and batches have no limit)."""
    try:
        return max(0.0, float(os.environ.get("WORKBENCH_MAX_RUN_SECONDS", "600")))
    except ValueError:
        return 600.0
