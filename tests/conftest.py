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
# tests that share a module-scoped store whose inputs they build on (SmolLM2's analyses: one SAE, one set of traces);
# apart, each worker would train them again
FUNCTION_GROUPS = {("test_real_model", "test_every_analysis_runs_on_it"): "smol-every-analysis"}
# the longest tests (minutes each) go first, so that neither worker is left with one of them at the end
FIRST = ("test_estimate.py::test_estimates_match_measured_peaks_on_the_default_model",
         "test_real_model.py::test_estimates_match_measured_peaks_on_it")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        group = GROUPS.get(module) or FUNCTION_GROUPS.get((module, getattr(item, "originalname", item.name)))
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: not item.nodeid.endswith(FIRST))  # stable: the rest keep their order


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
