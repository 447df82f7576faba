"""One path for every analysis: spec -> run key -> store hit, or compute -> store -> result.

    outcome = run(ModelViewSpec(prompt="The capital of France is"), store=get_store())
    outcome.result.table      # tidy DataFrame
    outcome.hit               # True if it came from the store and nothing was computed

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import WorkbenchError
from .models import ModelHandle, load_model
from .specs import ModelViewSpec, PromptSpec, Spec
from .store import Result, RunRecord, Store

log = logging.getLogger("workbench.runs")

Progress = Callable[[float, str], None]  # fraction done in [0, 1], what is happening


@dataclass(frozen=True)
class Analysis:
    name: str
    spec_cls: type[Spec]
    compute: Callable[[ModelHandle, Spec, Progress], Result]
    version: str  # bump whenever the computation's output changes
    description: str


REGISTRY: dict[str, Analysis] = {}


def register(spec_cls: type[Spec], version: str, description: str | None = None):
    """Register an analysis; its description defaults to the spec's title."""

    def deco(fn):
        REGISTRY[spec_cls.analysis] = Analysis(spec_cls.analysis, spec_cls, fn, version,
                                               description or spec_cls.title)
        return fn

    return deco


@dataclass
class RunOutcome:
    key: str
    spec: Spec  # with token ids resolved
    result: Result
    hit: bool
    record: RunRecord


@functools.lru_cache(maxsize=8)
def get_store(path: str | None = None) -> Store:
    """The process's Store object for a path (one per path; the Store itself is thread-safe)."""
    return Store(Path(path) if path else None)


def spec_from_dict(data: dict) -> Spec:
    name = data.get("analysis") if isinstance(data, dict) else None
    if name not in REGISTRY:
        raise WorkbenchError(f"Unknown analysis {name!r}.", hint=f"Known: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name].spec_cls.from_dict(data)


def run_key(fingerprint: str, spec: Spec, version: str) -> str:
    payload = spec.to_dict()
    for text, ids in getattr(spec, "display_only", {}).items():
        if getattr(spec, ids):
            payload.pop(text)  # display only: the ids are what ran
    payload.pop("model"), payload.pop("revision")  # the fingerprint already names the weights
    blob = json.dumps({"analysis": spec.analysis, "version": version, "fingerprint": fingerprint,
                       "spec": payload}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def resolve_tokens(spec: Spec, handle: ModelHandle) -> Spec:
    """Fill in token ids from the prompt (or check given ids against the model)."""
    from .model_view import check_token_ids, encode

    if isinstance(spec, PromptSpec):
        if spec.token_ids:
            check_token_ids(handle, list(spec.token_ids))
        else:
            spec = spec.replace(token_ids=tuple(encode(handle, spec.prompt)))
    if hasattr(spec, "resolve"):  # the analysis's own ids (prompt pairs, target tokens)
        spec = spec.resolve(handle)
    return spec


def run(spec: Spec, *, store: Store | None = None, device: str = "auto", allow_compute: bool = True,
        author: str = "", progress: Progress | None = None) -> RunOutcome:
    store = store or get_store()
    analysis = REGISTRY.get(spec.analysis)
    if analysis is None:
        raise WorkbenchError(f"Unknown analysis {spec.analysis!r}.")
    progress = progress or (lambda frac, what: None)
    if not allow_compute:
        with store.session():
            return _lookup_only(spec, analysis, store)

    progress(0.0, f"loading {spec.model}")
    handle = load_model(spec.model, revision=spec.revision or None, device=device, dtype=spec.dtype)
    store.remember_model(spec.model, spec.revision, spec.dtype, handle.fingerprint, handle.summary.as_dict())
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
    store.count_miss()
    log.info("computing %s %s", spec.analysis, key)
    t0 = time.perf_counter()
    import inspect

    if "store" in inspect.signature(analysis.compute).parameters:  # an analysis built on another stored one
        result = analysis.compute(handle, spec, progress, store=store)
    else:
        result = analysis.compute(handle, spec, progress)
    result.meta.setdefault("model_summary", handle.summary.as_dict())
    record = RunRecord(key=key, analysis=spec.analysis, spec=spec.to_dict(), model=spec.model,
                       fingerprint=handle.fingerprint, version=analysis.version, author=author,
                       duration_s=time.perf_counter() - t0)
    store.put(record, result)
    progress(1.0, "done")
    return RunOutcome(key, spec, result, False, store.run(key) or record)


def _lookup_only(spec: Spec, analysis: Analysis, store: Store) -> RunOutcome:
    model = store.model_record(spec.model, spec.revision, spec.dtype)
    if model is None:
        raise WorkbenchError(f"Review mode: nothing has been stored for {spec.model} ({spec.dtype}).",
                             hint="Review mode only shows stored results; ask for this run in a computing app.")
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


# ----------------------------------------------------------------------------------------------------------
# Analyses
# ----------------------------------------------------------------------------------------------------------
from . import patching as _patching  # noqa: E402

from . import atlas as _atlas  # noqa: E402
from . import bottleneck as _bottleneck  # noqa: E402
from . import concepts as _concepts  # noqa: E402
from . import entropy as _entropy  # noqa: E402
from . import infoplane as _infoplane  # noqa: E402
from . import intervention as _intervention  # noqa: E402
from . import lens as _lens  # noqa: E402
from . import quant as _quant  # noqa: E402
from . import tcav as _tcav  # noqa: E402
from . import tuned_lens as _tuned_lens  # noqa: E402

register(_patching.PatchingSpec, version="1")(_patching.compute)
register(_tuned_lens.TunedLensSpec, version="1")(_tuned_lens.compute)
register(_lens.LensSpec, version="1")(_lens.compute)
register(_entropy.EntropySpec, version="1")(_entropy.compute)
register(_concepts.ConceptActivationsSpec, version="2")(_concepts.compute_activations)
register(_concepts.ProbeSpec, version="2")(_concepts.compute_probes)
register(_bottleneck.BottleneckSpec, version="1")(_bottleneck.compute)
register(_intervention.InterventionSpec, version="1")(_intervention.compute)
register(_tcav.TCAVSpec, version="1")(_tcav.compute)
register(_atlas.AtlasSpec, version="1")(_atlas.compute)
register(_quant.QuantSensitivitySpec, version="1")(_quant.compute_sensitivity)
register(_quant.QuantAllocationSpec, version="1")(_quant.compute_allocation)
register(_infoplane.InfoPlaneSpec, version="1")(_infoplane.compute)

@register(ModelViewSpec, version="1")
def _model_view(handle: ModelHandle, spec: ModelViewSpec, progress: Progress) -> Result:
    from .model_view import attention_patterns, next_token_predictions, tokenize

    ids = list(spec.token_ids)
    progress(0.2, "next-token predictions")
    preds = next_token_predictions(handle, ids, k=spec.top_k)
    progress(0.5, "attention patterns")
    att = attention_patterns(handle, ids)
    return Result(table=preds, meta={"n_tokens": len(ids)},
                  extra={"tokens": tokenize(handle, ids), "attention": att})
