"""Batches: many specs planned once, computed by an executor (in this process, or Ray actors on a cluster), and
written to one store by the driver as each result arrives.

    items = plan(specs, store)                 # resolve, key, skip what the store holds, inputs first
    report = execute(items, store, LocalExecutor())            # or RayExecutor(address="auto", workers=2)
    report.table()                             # hit / computed / failed (reason) / time / worker per spec

Planning loads each model once in the driver (its tokenizer resolves token ids, its fingerprint makes the run
keys), adds the declared inputs of every spec as items of their own (so a probe and the bottleneck built on it
share one activations run), and orders items so that inputs come before what needs them. Items of one model are
grouped: an actor keeps the model it loaded and gets that model's items while any remain.

The driver is the only process that writes the store (DuckDB allows one writer): a worker returns the result
as Parquet bytes and the run's facts; the driver writes each in its own transaction as it arrives, so a batch
stopped at any point keeps what finished and a rerun computes only the rest. A key is written once.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd

from .errors import WorkbenchError
from .models import load_model
from .registry import get_analysis
from .result import Result, decode_result, encode_result
from .runner import (
    compute_run,
    declared_inputs,
    make_record,
    resolve_tokens,
    run,
    run_key,
    spec_from_dict,
    where,
    with_smaller_defaults,
)
from .specs import Spec
from .store import Store

__all__ = ["BatchReport", "Item", "LocalExecutor", "RayExecutor", "execute", "page_specs", "plan",
           "ray_runtime_env"]


@dataclass
class Item:
    """One run of a batch: a spec the user gave, or an input one of them declared."""

    index: int
    spec: Spec  # token ids resolved (or as given, when planning failed)
    key: str = ""
    fingerprint: str = ""
    group: tuple = ()  # (model, revision, dtype): the model an actor keeps loaded for it
    inputs: dict[str, tuple[str, Any]] = field(default_factory=dict)  # name -> ("run", item index) | ("data", frame)
    given: bool = True  # False: added by the plan as another item's input
    status: str = "todo"  # hit | todo | computed | failed
    reason: str = ""
    seconds: float = 0.0
    worker: str = ""
    attempts: int = 0

    def row(self) -> dict:
        return {"item": self.index, "analysis": self.spec.analysis, "model": self.spec.model, "key": self.key,
                "status": self.status, "reason": self.reason, "seconds": round(self.seconds, 3),
                "worker": self.worker, "attempts": self.attempts, "input": not self.given}


def plan(specs: Iterable[Spec], store: Store, *, device: str = "auto") -> list[Item]:
    """Items in an order where every input precedes what needs it; what the store already holds is a hit."""
    items: list[Item] = []
    by_key: dict[str, int] = {}

    def add(spec: Spec, given: bool) -> int:
        analysis = get_analysis(spec.analysis)
        handle = load_model(spec.model, revision=spec.revision or None, device=device, dtype=spec.dtype)
        store.remember_model(spec.model, spec.revision, spec.dtype, handle.fingerprint,
                             {**handle.summary.as_dict(), "prepends_bos": handle.prepends_bos})
        spec = resolve_tokens(spec, handle)
        key = run_key(handle.fingerprint, spec, analysis.version)
        if key in by_key:
            items[by_key[key]].given |= given
            return by_key[key]
        declared = declared_inputs(analysis, spec, store.get_dataset, handle, lambda sub: ("run", add(sub, False)))
        inputs = {name: value if isinstance(value, tuple) else ("data", value) for name, value in declared.items()}
        item = Item(len(items), spec, key, handle.fingerprint, (spec.model, spec.revision, spec.dtype), inputs, given)
        items.append(item)
        by_key[key] = item.index
        return item.index

    for spec in specs:
        try:
            add(spec, True)
        except WorkbenchError as e:
            items.append(Item(len(items), spec, status="failed", reason=str(e)))
    held = store.stored_keys([i.key for i in items if i.key])
    for item in items:
        if item.key in held:
            item.status = "hit"
    return items


# ----------------------------------------------------------------------------------------------------------
# What a worker does with one item (the same function in this process and in a Ray actor)
# ----------------------------------------------------------------------------------------------------------
def payload(item: Item, items: list[Item], store: Store) -> dict:
    """What a worker needs to compute an item: its spec, the fingerprint planned, and its inputs (stored runs
    read from the store, datasets) as Parquet bytes."""
    inputs = {}
    for name, (kind, value) in item.inputs.items():
        if kind == "data":
            inputs[name] = {"kind": "data", "tables": encode_result(Result(value))}
        else:
            dep = items[value]
            result = store.get(dep.key)
            if result is None:
                raise WorkbenchError(f"The input {name} ({dep.spec.analysis}) of this run is not in the store.")
            inputs[name] = {"kind": "run", "key": dep.key, "spec": dep.spec.to_json(), "tables": encode_result(result)}
    return {"spec": item.spec.to_json(), "fingerprint": item.fingerprint, "key": item.key, "inputs": inputs}


def compute_payload(job: dict, device: str = "auto") -> dict:
    """Compute one planned item (in the worker's process); never raises for a person's error: returns it."""
    from .runner import RunOutcome

    t0 = time.perf_counter()
    try:
        spec = spec_from_dict(json.loads(job["spec"]))
        handle = load_model(spec.model, revision=spec.revision or None, device=device, dtype=spec.dtype)
        if handle.fingerprint != job["fingerprint"]:
            raise WorkbenchError(f"{spec.model} has other weights on this worker than where the batch was planned.",
                                 hint="Give every node the same model files (or revision).")
        inputs: dict[str, Any] = {}
        for name, got in job["inputs"].items():
            result = decode_result(got["tables"])
            if got["kind"] == "data":
                inputs[name] = result.table
            else:
                sub = spec_from_dict(json.loads(got["spec"]))
                inputs[name] = RunOutcome(got["key"], sub, result, True, None)
        result, seconds = compute_run(get_analysis(spec.analysis), spec, inputs, handle)
    except WorkbenchError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0, "worker": where()}
    except Exception as e:  # noqa: BLE001 - a defect in one analysis must not stop the batch; it is reported
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0, "worker": where()}
    return {"tables": encode_result(result), "seconds": seconds, "worker": where()}


# ----------------------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------------------
class LocalExecutor:
    """Items one after another in this process, through the runner (what the app and the CLI do)."""

    name = "local"

    def __init__(self, device: str = "auto", author: str = ""):
        self.device, self.author = device, author

    def execute(self, items: list[Item], store: Store, done: Callable[[Item], None], running: Callable) -> None:
        for item in items:
            if item.status != "todo":
                continue
            if failed := _failed_input(item, items):
                item.status, item.reason = "failed", failed
                done(item)
                continue
            running({"local": item.spec.model})
            t0 = time.perf_counter()
            item.attempts = 1
            try:
                out = run(item.spec, store=store, device=self.device, author=self.author)
            except WorkbenchError as e:
                item.status, item.reason = "failed", str(e)
            else:
                item.status = "hit" if out.hit else "computed"
                item.worker = out.record.worker if out.record else ""
            item.seconds = time.perf_counter() - t0
            done(item)


def _failed_input(item: Item, items: list[Item]) -> str:
    for name, (kind, value) in item.inputs.items():
        if kind == "run" and items[value].status == "failed":
            return f"its input {name} ({items[value].spec.analysis}) failed"
    return ""


class RayExecutor:
    """Ray actors, each keeping the models it loaded; the driver hands out items (inputs first, a model's items
    to the actor holding it) and writes each result as it arrives. An actor that dies is replaced and its item
    retried up to `max_retries` times."""

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float | None = None, device: str = "auto", max_retries: int = 2,
                 author: str = "", on_result: Callable[["RayExecutor", Item], None] | None = None):
        self.address, self.workers, self.device = address, workers, device
        self.cpus, self.gpus, self.max_retries, self.author = cpus_per_worker, gpus_per_worker, max_retries, author
        self.on_result = on_result  # tests: called after each result is written (e.g. to kill an actor)
        self.busy: dict[Any, tuple[Any, Item]] = {}  # future -> (actor, item)
        self.model_of: dict[Any, tuple] = {}  # actor -> the group it last worked on
        self.replaced = 0

    def _init(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address or None, runtime_env=ray_runtime_env(), include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        resources = ray.cluster_resources()
        gpus = self.gpus if self.gpus is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
        if self.workers is None:
            slots = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1) / self.cpus
            self.workers = max(1, int(slots))
        self.options = {"num_cpus": self.cpus, "num_gpus": gpus, "max_restarts": 0}
        self.device = self.device if self.device != "auto" else ("cuda" if gpus else "cpu")
        return ray

    def _actor(self):
        import ray

        return ray.remote(BatchWorker).options(**self.options).remote(self.device)

    def execute(self, items: list[Item], store: Store, done: Callable[[Item], None], running: Callable) -> None:
        ray = self._init()
        todo = [i for i in items if i.status == "todo"]
        self.actors = [self._actor() for _ in range(min(self.workers, len(todo)) or 0)]
        idle = list(self.actors)
        waiting = list(todo)  # in plan order: inputs before what needs them

        def ready(item: Item) -> bool:
            return all(kind == "data" or items[v].status in ("hit", "computed") for kind, v in item.inputs.values())

        while waiting or self.busy:
            for item in list(waiting):  # an item whose input failed fails too
                if failed := _failed_input(item, items):
                    waiting.remove(item)
                    item.status, item.reason = "failed", failed
                    done(item)
            while idle and waiting:
                actor = idle.pop(0)
                candidates = [i for i in waiting if ready(i)]
                if not candidates:
                    idle.insert(0, actor)
                    break
                same = [i for i in candidates if i.group == self.model_of.get(actor)]
                item = (same or candidates)[0]
                waiting.remove(item)
                item.attempts += 1
                try:
                    job = payload(item, items, store)
                except WorkbenchError as e:
                    item.status, item.reason = "failed", str(e)
                    done(item)
                    idle.insert(0, actor)
                    continue
                self.busy[actor.compute.remote(job)] = (actor, item)
                self.model_of[actor] = item.group
            running({repr(a)[-8:]: self.model_of.get(a, ("-",))[0] for a in self.actors})
            if not self.busy:
                if waiting:  # nothing can start and nothing runs: inputs never arrived
                    for item in waiting:
                        item.status, item.reason = "failed", "its inputs were not computed"
                        done(item)
                    waiting.clear()
                continue
            (future,), _ = ray.wait(list(self.busy), num_returns=1)
            actor, item = self.busy.pop(future)
            try:
                out = ray.get(future)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as e:  # the actor died (killed, out of memory): replace it
                self._replace(actor, idle)
                if item.attempts > self.max_retries:
                    item.status, item.reason = "failed", f"its worker died {item.attempts} times ({type(e).__name__})"
                    done(item)
                else:
                    waiting.insert(0, item)
                continue
            idle.append(actor)
            item.seconds, item.worker = out["seconds"], out["worker"]
            if "error" in out:
                item.status, item.reason = "failed", out["error"]
            else:
                self._write(item, decode_result(out["tables"]), store)
            done(item)
            if self.on_result is not None:
                self.on_result(self, item)

    def _replace(self, actor, idle: list) -> None:
        import ray

        ray.kill(actor, no_restart=True)
        self.actors.remove(actor)
        self.model_of.pop(actor, None)
        new = self._actor()
        self.actors.append(new)
        idle.append(new)
        self.replaced += 1

    def _write(self, item: Item, result: Result, store: Store) -> None:
        if store.stored_keys([item.key]):  # another writer stored it meanwhile: never written twice
            item.status = "hit"
            return
        analysis = get_analysis(item.spec.analysis)
        record = make_record(item.key, item.spec, item.fingerprint, analysis, self.author, item.seconds,
                             item.worker)
        store.put(record, result)
        item.status = "computed"



def ray_runtime_env() -> dict:
    """What Ray's workers need from this process: the workbench on their path, its and the hub's settings."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k.startswith(("WORKBENCH_", "HF_")) or k == "TQDM_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": env}


class BatchWorker:
    """A Ray actor's body: keeps the models it loaded (the process's model cache) and computes items."""

    def __init__(self, device: str = "auto"):
        import torch

        self.device = device
        cpus = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if cpus > 0:
            torch.set_num_threads(cpus)

    def compute(self, job: dict) -> dict:
        return compute_payload(job, self.device)


# ----------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------
@dataclass
class BatchReport:
    id: str
    items: list[Item]
    seconds: float

    def table(self, given_only: bool = False) -> pd.DataFrame:
        return pd.DataFrame([i.row() for i in self.items if i.given or not given_only])

    def counts(self) -> dict[str, int]:
        out = {"hit": 0, "computed": 0, "failed": 0, "todo": 0}
        for i in self.items:
            out[i.status] = out.get(i.status, 0) + 1
        return out

    def summary(self) -> dict:
        return {"batch": self.id, "seconds": round(self.seconds, 2), "counts": self.counts(),
                "items": self.table().to_dict(orient="records")}


def execute(items: list[Item], store: Store, executor, *, progress: Callable[[dict], None] | None = None,
            batch_id: str | None = None) -> BatchReport:
    """Run the plan's items that are not hits; the store's batch record shows progress to the Runs page."""
    batch_id = batch_id or uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    total = len(items)
    state = {"running": {}}
    store.start_batch(batch_id, total=total, hits=sum(i.status == "hit" for i in items),
                      failed=sum(i.status == "failed" for i in items), executor=executor.name)

    def report() -> None:
        counts = {s: sum(i.status == s for i in items) for s in ("hit", "computed", "failed")}
        store.update_batch(batch_id, done=counts["computed"], hits=counts["hit"], failed=counts["failed"])
        if progress is not None:
            progress({**counts, "total": total, "running": state["running"]})

    def running(workers: dict) -> None:
        state["running"] = workers

    status = "interrupted"
    try:
        report()
        executor.execute(items, store, lambda item: report(), running)
        status = "finished"
    finally:
        store.update_batch(batch_id, status=status)
    return BatchReport(batch_id, items, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# Batch generators
# ----------------------------------------------------------------------------------------------------------
def page_specs(model: str, *, revision: str = "", dtype: str = "float32", device: str = "auto",
               full_defaults: bool = False) -> list[Spec]:
    """Every page's default analysis for a model, as its page would run it when opened with that model picked
    (the page's own starting fields, and the smaller settings it picks for a large model): warming a store for
    a review deployment."""
    from .registry import ANALYSES

    handle = load_model(model, revision=revision or None, device=device, dtype=dtype)
    specs = []
    for a in ANALYSES:
        if a.page is None:
            continue
        fields = {"model": model, "revision": revision, "dtype": dtype, **a.page.defaults}
        spec = a.spec(**fields)
        if not full_defaults:
            spec, _ = with_smaller_defaults(spec, handle.summary, given=set(fields))
        specs.append(spec)
    return specs


def sweep_checkpoints(base: list[dict], checkpoints: list[str]) -> list[dict]:
    """One spec per checkpoint and base spec: a checkpoint that is a folder (or the default model) is the model,
    anything else a revision of the base spec's hub model."""
    from pathlib import Path

    from .models import DEFAULT_MODEL

    out = []
    for ckpt in checkpoints:
        is_model = ckpt == DEFAULT_MODEL or Path(ckpt).expanduser().exists()
        for b in base:
            out.append({**b, "model": ckpt} if is_model else {**b, "revision": ckpt})
    return out


def checkpoint_list(arg: str) -> list[str]:
    """A comma-separated list, or a folder whose subfolders are checkpoints (sorted by training step)."""
    from pathlib import Path

    from .models import list_checkpoints

    folder = Path(arg).expanduser()
    if "," not in arg and folder.is_dir() and not (folder / "config.json").exists():
        found = list_checkpoints(folder)
        if not found:
            raise WorkbenchError(f"{arg} holds no checkpoint folders (step-N with a config.json).")
        return [str(path) for _, path in found]
    return [c.strip() for c in arg.split(",") if c.strip()]


def sweep_prompts(base: list[dict], path) -> list[dict]:
    """One spec per non-empty line of a text file and base spec: a prompt, or for patching one set of prompt
    pairs (a JSON list, the `pairs` field's format)."""
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise WorkbenchError(f"Cannot read {path}: {e.strerror}.") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = []
    for b in base:
        cls = get_analysis(b.get("analysis")).spec
        if "prompt" in cls.field_names():
            sets = [("prompt", line) for line in lines]
        elif "pairs" in cls.field_names():
            sets = [("pairs", line) for line in lines]
        else:
            raise WorkbenchError(f"{b.get('analysis')} takes no prompts; --sweep prompts is for analyses with a "
                                 "prompt or prompt pairs.")
        if not sets:
            raise WorkbenchError(f"{path} holds no prompts.")
        out += [{**b, name: value, "token_ids": []} if name == "prompt" else {**b, name: value}
                for name, value in sets]
    return out
