import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from tiny_models import ARCHITECTURES, save_tiny_model  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # two worker processes on two cores: one torch thread each
    import torch

    torch.set_num_threads(1)

# tests that must share a worker process: the Ray cluster tests (one local cluster at a time), the browser tests
GROUPS = {"test_batch": "ray", "test_batch_nodes": "ray", "test_browser": "browser", "test_browser_links": "browser"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = GROUPS.get(item.module.__name__.rsplit(".", 1)[-1])
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def default_handle():
    from analysis import load_model

    return load_model("default")


@pytest.fixture()
def default_session(default_handle):
    """The default model's session (its lock held) for tests that call library functions taking one."""
    from analysis.session import ModelSession

    with ModelSession(default_handle) as s:
        yield s


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny_handle(request, tiny_dirs):
    from analysis import load_model

    return load_model(str(tiny_dirs[request.param]))
