"""Batches: the plan (run keys, hits, inputs first), the local executor, and Ray: a real local cluster of 2 CPU
actors whose results equal the local executor's, and an actor killed in the middle of a batch. (Two Ray nodes:
test_batch_nodes.py, a separate module so its `ray stop` cannot touch this module's cluster.)"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import ray

from analysis.__main__ import main as cli
from analysis.batch import LocalExecutor, RayExecutor, execute, page_specs, plan, ray_runtime_env
from analysis.models import list_checkpoints
from analysis.runner import spec_from_dict
from analysis.store import Store

CKPT = str(dict(list_checkpoints())[2000])
PROMPTS = ("The capital of France is", "Then, John and Mary went to the store. John gave a ring to")


def batch_specs() -> list:
    """10 specs of 4 analyses on the default model and a training checkpoint; probes declare the concept
    activations as an input, so the plan adds them."""
    out = []
    for model in ("default", CKPT):
        for prompt in PROMPTS:
            out.append({"analysis": "lens", "model": model, "prompt": prompt})
        out.append({"analysis": "entropy", "model": model, "prompt": PROMPTS[1]})
        out.append({"analysis": "model", "model": model, "prompt": PROMPTS[0], "top_k": 3})
        out.append({"analysis": "probes", "model": model, "max_sentences": 80})
    return [spec_from_dict(s) for s in out]


def tables_equal(a: Store, b: Store, keys) -> None:
    """Equal tables; floats to float32 summation order (an actor computes with one thread, this process two)."""
    for key in keys:
        ra, rb = a.get(key), b.get(key)
        assert ra is not None and rb is not None, key
        assert ra.tables().keys() == rb.tables().keys()
        for name in ra.tables():
            pd.testing.assert_frame_equal(ra.tables()[name], rb.tables()[name], check_exact=False, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env(), log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> tuple[Store, list]:
    store = Store(tmp_path_factory.mktemp("local") / "s.duckdb")
    items = plan(batch_specs(), store)
    report = execute(items, store, LocalExecutor())
    assert report.counts()["failed"] == 0, report.table()
    return store, items


def test_the_plan_adds_inputs_first_and_skips_what_is_stored(local_store, tmp_path):
    store, items = local_store
    assert len(items) == 12 and sum(not i.given for i in items) == 2  # the two concept-activation runs
    for item in items:
        for kind, dep in item.inputs.values():
            if kind == "run":
                assert dep < item.index and items[dep].spec.analysis == "concept_activations"
    again = plan(batch_specs(), store)
    assert [i.key for i in again] == [i.key for i in items] and all(i.status == "hit" for i in again)
    assert store.count() == 12
    batches = store.batches()
    assert batches.iloc[0]["status"] == "finished" and batches.iloc[0]["done"] == 12


def test_ray_actors_compute_what_the_local_executor_does(cluster, local_store, tmp_path):
    local, local_items = local_store
    store = Store(tmp_path / "ray.duckdb")
    items = plan(batch_specs(), store)
    executor = RayExecutor(workers=2)
    report = execute(items, store, executor)
    assert report.counts() == {"hit": 0, "computed": 12, "failed": 0, "todo": 0}, report.table()
    assert [i.key for i in items] == [i.key for i in local_items]
    tables_equal(local, store, [i.key for i in items])
    runs = store.runs()
    assert len(runs) == 12 and runs["worker"].str.startswith("node ").all()
    assert runs["worker"].nunique() == 2  # both actors worked (each its own process)
    rerun = plan(batch_specs(), store)
    assert all(i.status == "hit" for i in rerun)


def test_an_actor_killed_mid_batch_loses_and_duplicates_nothing(cluster, local_store, tmp_path):
    local, local_items = local_store
    store = Store(tmp_path / "ray.duckdb")
    killed = []

    def kill_one(ex: RayExecutor, item) -> None:
        if killed:
            return
        for future, (actor, it) in ex.busy.items():
            done, _ = ray.wait([future], timeout=0)
            if not done:  # still computing: its process dies with the spec in flight
                killed.append(it)
                ray.kill(actor)
                return

    executor = RayExecutor(workers=2, on_result=kill_one)
    items = plan(batch_specs(), store)
    report = execute(items, store, executor)
    assert killed, "no actor was busy when a result arrived"
    # the dead actor was replaced once and one spec (the one in flight, unless it finished in the instant before
    # the kill) ran a second time
    assert executor.replaced == 1 and sum(i.attempts == 2 for i in items) == 1
    assert report.counts() == {"hit": 0, "computed": 12, "failed": 0, "todo": 0}, report.table()
    runs = store.runs()
    assert len(runs) == 12 and runs["key"].is_unique and set(runs["key"]) == {i.key for i in local_items}
    assert store.count("results") == local.count("results")
    tables_equal(local, store, [i.key for i in items])


def test_a_failing_spec_is_reported_and_the_batch_goes_on(cluster, tmp_path):
    store = Store(tmp_path / "s.duckdb")
    specs = [spec_from_dict({"analysis": "lens", "prompt": PROMPTS[0]}),
             spec_from_dict({"analysis": "lens", "prompt": PROMPTS[0], "target_ids": [10**6]}),  # not in the vocab
             spec_from_dict({"analysis": "model", "prompt": PROMPTS[1]})]
    items = plan(specs, store)
    assert items[1].status == "failed" and "vocabulary" in items[1].reason.lower()
    report = execute(items, store, RayExecutor(workers=1))
    assert report.counts() == {"hit": 0, "computed": 2, "failed": 1, "todo": 0}
    assert store.count() == 2


def test_the_cli_runs_a_batch_file_and_writes_a_summary(tmp_path, capsys):
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([{"analysis": "lens", "prompt": PROMPTS[0]},
                                 {"analysis": "entropy", "prompt": PROMPTS[1]}]))
    store, summary = tmp_path / "s.duckdb", tmp_path / "out.json"
    assert cli(["batch", str(specs), "--store", str(store), "--summary", str(summary)]) == 0
    first = json.loads(summary.read_text())
    assert first["counts"]["computed"] == 2
    assert cli(["batch", str(specs), "--store", str(store), "--summary", str(summary)]) == 0
    assert json.loads(summary.read_text())["counts"] == {"hit": 2, "computed": 0, "failed": 0, "todo": 0}
    assert cli(["batch", str(tmp_path / "missing.json"), "--store", str(store)]) == 2
    assert "Cannot read the spec file" in capsys.readouterr().err


def test_sweeps_and_warm_pages_make_the_specs(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on\n\nOnce upon a time\n")
    store = tmp_path / "s.duckdb"
    assert cli(["batch", "--analysis", "model", "--set", "top_k=3", "--sweep", "prompts", str(prompts),
                "--store", str(store)]) == 0
    assert cli(["batch", "--analysis", "lens", "--set", f"prompt={PROMPTS[0]}", "--sweep", "checkpoints",
                str(dict(list_checkpoints())[100].parent), "--store", str(store)]) == 0
    runs = Store(store).runs()
    assert sorted(runs[runs.analysis == "lens"]["model"]) == sorted(str(p) for _, p in list_checkpoints())
    assert len(runs[runs.analysis == "model"]) == 2
    pages = page_specs("default")
    from analysis.registry import ANALYSES

    assert {s.analysis for s in pages} == {a.name for a in ANALYSES if a.page is not None}
    assert cli(["batch", "--sweep", "nothing", "x", "--analysis", "lens", "--store", str(store)]) == 2
    assert "sweep checkpoints or prompts" in capsys.readouterr().err
