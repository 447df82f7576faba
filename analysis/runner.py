"""The runner: one path for every analysis, and the only code that writes results to the store.

    outcome = run(ModelViewSpec(prompt="The capital of France is"), store=get_store())
    outcome.result.table      # tidy DataFrame
    outcome.hit               # True if it came from the store and nothing was computed

spec -> model (loaded once per process) -> token ids resolved -> run key -> store hit, or: the declared inputs
resolved (read from the store, or run first), the model session opened (the model's lock held, its hooks,
`requires_grad` and train/eval state put back afterwards), compute(session, spec, inputs, progress), and the
result written in one transaction.

The run key is a hash of the model fingerprint, the spec (with its token ids), and the analysis's code version,
so a changed analysis or a changed model never serves a stale result. With `allow_compute=False` (review mode)
nothing is loaded or computed: the model's fingerprint comes from the store's record of it, and a result that
is not stored is an error.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .contract import Analysis, Dataset, Needs
from .errors import WorkbenchError
from .estimate import Estimate, Peak, check_fits, estimate_run, measure_peak, smaller_defaults, timing_meta
from .models import ModelHandle, load_model
from .registry import REGISTRY, get_analysis
from .result import Progress, Result, RunRecord, no_progress
from .session import ModelSession
from .settings import review_mode
from .specs import PromptSpec, Spec
from .store import Store
from .tokens import bos_flag, check_token_ids, encode

log = logging.getLogger("workbench.runner")

__all__ = ["REGISTRY", "RunOutcome", "check_run_key", "get_store", "run", "run_key", "spec_from_dict"]


@dataclass
class RunOutcome:
    key: str
    spec: Spec  # with token ids resolved
    result: Result
    hit: bool
    record: RunRecord


def get_store(path: str | None = None) -> Store:
    """The process's Store object for a path (one per path; the Store itself is thread-safe), opened read-only in
    review mode."""
    return _store(path, review_mode())


@functools.lru_cache(maxsize=8)
def _store(path: str | None, read_only: bool) -> Store:
    return Store(Path(path) if path else None, read_only=read_only)


get_store.cache_clear = _store.cache_clear  # tests point WORKBENCH_STORE elsewhere and start afresh


def spec_from_dict(data: dict) -> Spec:
    name = data.get("analysis") if isinstance(data, dict) else None
    return get_analysis(name).spec.from_dict(data)


def run_key(fingerprint: str, spec: Spec, version: str) -> str:
    payload = spec.to_dict()
    for text, ids in getattr(spec, "display_only", {}).items():
        if getattr(spec, ids):
            payload.pop(text)  # display only: the ids are what ran
    payload.pop("model"), payload.pop("revision")  # the fingerprint already names the weights
    for name, value in spec.key_legacy.items():
        if payload.get(name) == value:
            payload.pop(name)
    blob = json.dumps({"analysis": spec.analysis, "version": version, "fingerprint": fingerprint,
                       "spec": payload}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def check_run_key(row: dict) -> None:
    """Raise unless a run row's key is the hash of its own fingerprint, spec and version, so an imported row
    cannot claim another run's key (store.import_store and import_parquet call it on every run row)."""
    spec = get_analysis(row["analysis"]).spec.from_dict(json.loads(row["spec"]))
    if run_key(row["fingerprint"], spec, row["version"]) != row["key"]:
        raise ValueError("its key is not the hash of its fingerprint, spec and version")


def resolve_tokens(spec: Spec, handle: ModelHandle) -> Spec:
    """Fill in token ids from the prompt (or check given ids against the model), then the analysis's own ids
    (prompt pairs, target tokens) through the spec's `resolve`."""
    spec = spec.replace(bos="yes" if bos_flag(handle, spec.bos) else "no")  # what ran, not "auto"
    if isinstance(spec, PromptSpec):
        if spec.token_ids:
            check_token_ids(handle, list(spec.token_ids))
        else:
            spec = spec.replace(token_ids=tuple(encode(handle, spec.prompt, spec.bos)))
    return spec.resolve(handle)


def run(spec: Spec, *, store: Store | None = None, device: str = "auto", allow_compute: bool = True,
        author: str = "", progress: Progress | None = None) -> RunOutcome:
    store = store or get_store()
    analysis = get_analysis(spec.analysis)
    progress = progress or no_progress
    if not allow_compute:
        with store.session():
            return _lookup_only(spec, analysis, store)

    progress(0.0, f"loading {spec.model}")
    handle = load_model(spec.model, revision=spec.revision or None, device=device, dtype=spec.dtype)
    store.remember_model(spec.model, spec.revision, spec.dtype, handle.fingerprint, handle.info)
    spec = resolve_tokens(spec, handle)
    key = run_key(handle.fingerprint, spec, analysis.version)
    with store.session():
        cached = store.get(key)
        record = store.run(key) if cached is not None else None
    if cached is not None:
        store.count_hit()
        log.info("store hit %s %s", spec.analysis, key)
        progress(1.0, "from the store")
        return RunOutcome(key, spec, cached, True, record)
    est = estimate_unstored(analysis, spec, handle, store)
    if est is not None:
        check_fits(est)  # before its inputs run: a run that cannot fit is refused before anything is computed
    inputs = resolve_inputs(analysis, spec, store=store, device=device, author=author, progress=progress,
                            handle=handle)
    store.count_miss()
    log.info("computing %s %s", spec.analysis, key)
    result, seconds = compute_run(analysis, spec, inputs, handle, progress, est=est)
    record = make_record(key, spec, handle.fingerprint, analysis, author, seconds)
    progress(1.0, "storing the result")  # the last point where a stopped run (analysis.jobs) stores nothing
    store.put(record, result)
    progress(1.0, "done")
    return RunOutcome(key, spec, result, False, store.run(key) or record)


def estimate_unstored(analysis: Analysis, spec: Spec, handle: ModelHandle, store: Store) -> Estimate | None:
    """The run's estimate (tokens resolved), without the input runs the store already holds: what running it
    now costs."""
    est = estimate_run(analysis, spec, handle, store=store)
    if est is None or not est.upstream:
        return est

    def held(sub: Spec) -> tuple[str, bool]:
        key = run_key(handle.fingerprint, resolve_tokens(sub, handle), get_analysis(sub.analysis).version)
        return sub.analysis, bool(store.stored_keys([key]))

    try:
        declared = {k: v for k, v in declared_inputs(analysis, spec, store.get_dataset, handle, held).items()
                    if isinstance(v, tuple) and v[1]}
    except WorkbenchError:  # an input that cannot be derived fails when it runs, with its message
        return est
    # an upstream estimate names its input where several share an analysis (a feature circuit's SAEs)
    est.upstream = [u for u in est.upstream
                    if not (u.input in declared if u.input else u.analysis in {a for a, _ in declared.values()})]
    return est


def estimate_defaults(analysis: Analysis, spec: Spec, chosen: dict, handle: ModelHandle,
                      store: Store) -> Estimate | None:
    """The estimate of `spec` (token ids not resolved yet) with the fields of `chosen` (smaller settings a page
    picked) back at the spec's defaults, on the same basis as the spec's own: what the page says the defaults
    would take."""
    defaults = type(spec)()
    full = spec.replace(**{k: getattr(defaults, k) for k in chosen})
    return estimate_unstored(analysis, resolve_tokens(full, handle), handle, store)


def compute_run(analysis: Analysis, spec: Spec, inputs: dict[str, Any], handle: ModelHandle,
                progress: Progress = no_progress, est: Estimate | None = None) -> tuple[Result, float]:
    """(result, seconds) of one computation whose inputs are resolved, in a model session; the part of a run
    that a batch worker does too (it never touches the store). Refuses a run that cannot fit free memory."""
    if est is None:
        est = estimate_run(analysis, spec, handle)
        if est is not None:
            check_fits(est)
    clean = handle.lock.acquire(blocking=False)
    if clean:
        handle.lock.release()
    else:  # say why nothing moves (another run holds the model; the app caps each run's time)
        progress(0.0, f"waiting for another run on {handle.name} to finish")
    entries = handle.turns.entries
    t0 = time.perf_counter()
    with ModelSession(handle) as session:
        t1 = time.perf_counter()
        result = analysis.compute(session, spec, inputs, progress)
    seconds = time.perf_counter() - t0
    if est is not None:
        # the machine's pace is learnt only from a run that had the model to itself from start to end
        clean = clean and handle.turns.entries == entries + 1
        result.meta.setdefault("estimate", {**_estimate_meta(est), "timing": timing_meta(
            est, time.perf_counter() - t1, handle.fingerprint, spec.dtype, handle.summary.d_model, clean)})
    result.meta.setdefault("model_summary", handle.summary.as_dict())
    return result, seconds


def make_record(key: str, spec: Spec, fingerprint: str, analysis: Analysis, author: str, seconds: float,
                worker: str = "") -> RunRecord:
    return RunRecord(key=key, analysis=spec.analysis, spec=spec.to_dict(), model=spec.model, fingerprint=fingerprint,
                     version=analysis.version, author=author, duration_s=seconds, worker=worker or where())


def where() -> str:
    """Where this process runs, for the run record: the Ray node when it is a Ray worker, else host and pid."""
    ray = sys.modules.get("ray")  # only a process that imported Ray can be one of its workers
    if ray is not None and ray.is_initialized():
        return f"node {ray.get_runtime_context().get_node_id()[:12]} pid {os.getpid()}"
    return f"{socket.gethostname()} pid {os.getpid()}"


def _estimate_meta(est: Estimate) -> dict:
    return {"peak_bytes": est.total_bytes, "parts": dict(est.parts), "seconds": round(est.seconds, 2),
            "flops": est.flops, "blocks": est.blocks, "basis": est.basis}


def with_smaller_defaults(spec: Spec, summary, given: set[str] | None = None) -> tuple[Spec, dict]:
    """`spec` with its analysis's smaller settings for this model (see contract.Analysis.smaller) in the fields
    not in `given` (default: those still at the spec class's default); returns (spec, {field: (default, chosen)})."""
    analysis = get_analysis(spec.analysis)
    defaults = type(spec)()
    if given is None:
        given = {f for f in spec.field_names() if getattr(spec, f) != getattr(defaults, f)}
    base = {k: v for k, v in spec.to_dict().items() if k in given or k in ("model", "revision", "dtype", "bos")}
    chosen, _, _ = smaller_defaults(analysis, summary, base, keep=given)
    changes = {k: v for k, v in chosen.items() if k not in given}
    if not changes:
        return spec, {}
    return spec.replace(**changes), {k: (getattr(defaults, k), v) for k, v in changes.items()}


def resolve_inputs(analysis: Analysis, spec: Spec, *, store: Store, device: str = "auto", author: str = "",
                   progress: Progress = no_progress, handle: ModelHandle | None = None) -> dict[str, Any]:
    """The declared inputs of a run, in order: datasets read (the shipped one, or an upload from the store),
    stored runs read from the store or run first (a `scaled` input with the smaller settings for a large model)."""
    return declared_inputs(analysis, spec, store.get_dataset, handle,
                           lambda sub: run(sub, store=store, device=device, author=author, progress=progress))


def declared_inputs(analysis: Analysis, spec: Spec, get_dataset, handle: ModelHandle | None,
                    resolve: Callable[[Spec], Any]) -> dict[str, Any]:
    """Walk an analysis's declared inputs in order: a dataset is loaded (`get_dataset` reads an upload), a stored
    run's spec is derived (with the smaller settings for a large model when `scaled`) and handed to `resolve`,
    whose answer is the input (the runner runs it; a batch plan adds it as an item)."""
    inputs: dict[str, Any] = {}
    for need in analysis.inputs:
        if isinstance(need, Dataset):
            inputs[need.name] = need.load(getattr(spec, need.field), get_dataset)
        elif isinstance(need, Needs):
            sub = need.spec(spec, inputs)
            subs = sub if isinstance(sub, dict) else {need.name: sub}  # several runs of one kind, by input name
            for name, one in subs.items():
                if one is not None and need.scaled and handle is not None:
                    one, _ = with_smaller_defaults(one, handle.summary)
                if one is not None:
                    inputs[name] = resolve(one)
        else:
            raise TypeError(f"unknown input declaration {need!r}")
    return inputs


def _lookup_only(spec: Spec, analysis: Analysis, store: Store) -> RunOutcome:
    model = store.model_record(spec.model, spec.revision, spec.dtype)
    if model is None:
        raise WorkbenchError(f"Review mode: nothing has been stored for {spec.model} ({spec.dtype}).",
                             hint="Review mode only shows stored results; ask for this run in a computing app.")
    if spec.bos == "auto":  # the tokenizer's convention, as recorded when the model was loaded (records from
        # before it was recorded are of runs that all had a BOS in front)
        spec = spec.replace(bos="yes" if model["summary"].get("prepends_bos", True) else "no")
    if isinstance(spec, PromptSpec) and not spec.token_ids:
        found = store.find_prompt_run(spec, analysis.version, model["fingerprint"])
        if found is None:
            raise WorkbenchError("Review mode: this prompt has not been run and stored.",
                                 hint="Open a link that was shared from a computing app.")
        spec = spec.replace(token_ids=tuple(found))
    key = run_key(model["fingerprint"], spec, analysis.version)
    result = store.get(key)
    if result is None:
        raise WorkbenchError("Review mode: this result is not in the store, and review mode computes nothing.",
                             hint="Open a link to a stored result, or run it in a computing app.")
    store.count_hit()
    return RunOutcome(key, spec, result, True, store.run(key))


def measure_run(spec: Spec, store: Store, device: str = "auto") -> tuple[Estimate | None, Peak, RunOutcome]:
    """(estimate, measured peak, outcome) of one run, its inputs run and stored first so the peak is the run's
    own (for tests and benchmarks)."""
    analysis = get_analysis(spec.analysis)
    handle = load_model(spec.model, revision=spec.revision or None, device=device, dtype=spec.dtype)
    resolved = resolve_tokens(spec, handle)
    resolve_inputs(analysis, resolved, store=store, device=device, handle=handle)
    est = estimate_run(analysis, resolved, handle, store=store)
    with measure_peak(handle.device) as peak:
        outcome = run(spec, store=store, device=device)
    return est, peak, outcome
