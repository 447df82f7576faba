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

# Tests that share a worker process (`--dist loadgroup`, two workers). xdist 3.8 reads an `xdist_group` mark into
# the test's id, which pytest 9 no longer lets it change: the marks grouped nothing. The groups are ours instead
# (pytest_xdist_make_scheduler below), from the test ids. A group holds tests that must not run beside each other
# (one local Ray cluster at a time; the browser tests' server) or that share a module's expensive fixture, which
# each worker would otherwise build again (the default SAE of test_features, SmolLM2's SAE and traces).
GROUPS = {"test_batch": "ray", "test_batch_nodes": "ray", "test_browser": "browser", "test_browser_links": "browser",
          "test_features": "features", "test_model_switch": "model-switch",
          "test_circuits": "circuits", "test_bfloat16": "bfloat16",
          "test_feature_circuits": "feature-circuits"}  # the last three: a module's shared run or store
FUNCTION_GROUPS = {("test_real_model", "test_every_analysis_runs_on_it"): "smol-every-analysis"}
# the longest work goes first (minutes each), so that neither worker is left with it at the end; the rest keep
# their order
FIRST = ("test_real_model.py::test_estimates_match_measured_peaks_on_it",
         "test_estimate.py::test_estimates_match_measured_peaks_on_the_default_model",
         "features", "smol-every-analysis", "browser", "model-switch", "ray")


def group_of(nodeid: str) -> str | None:
    path, _, name = nodeid.partition("::")
    module = Path(path).stem
    return GROUPS.get(module) or FUNCTION_GROUPS.get((module, name.split("[")[0]))


def _rank(nodeid: str) -> int:
    group = group_of(nodeid)
    for i, first in enumerate(FIRST):
        if group == first or nodeid.endswith(first):
            return i
    return len(FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _rank(item.nodeid))  # stable: the rest keep their order


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: the suite also runs with -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with our groups: each group one unit of work, every other test its own, handed out in
    collection order (longest first, above)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid) or nodeid

    config.option.loadscopereorder = False  # keep the order above (xdist would sort units by their test count)
    return Groups(config, log)


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
