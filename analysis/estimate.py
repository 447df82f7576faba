"""Memory and time before a run.

Each analysis declares `estimate(plan) -> Estimate`: its peak memory from the model's shape and dtype and the
spec (weights, the activations of its largest batch, the tensors it keeps, vocabulary blocks, what it returns),
and its work in floating-point operations. The runner refuses a run whose working memory does not fit the free
memory of its device, naming the setting to lower; the page shows the estimate beside its Run button.

    est = estimate_run(spec, handle)
    est.total_bytes, est.seconds, est.describe()

Time is work / throughput: the throughput of this device on matrix products of the model's width, measured once
per process (a fraction of a second), times an efficiency learnt from the runs this process has finished (a
forward pass through hooks reaches a fraction of the matmul rate). It is a rough figure; memory is the one that
refuses a run.

Measured peaks (`measure_peak`, for tests and benchmarks): on CUDA the allocator's peak; on the CPU the process's
resident high-water mark (reset through /proc/self/clear_refs) above what was resident when the run began.
"""
from __future__ import annotations

import contextlib
import ctypes
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .errors import WorkbenchError
from .models import DTYPES, available_memory

GiB, MiB = 2**30, 2**20
F32 = 4


@dataclass(frozen=True)
class Shape:
    """What an estimate reads of a model: its dimensions (ModelSummary) and the bytes of one value in its dtype."""

    n_params: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    itemsize: int
    device: str
    gated: bool = False
    parallel: bool = False

    @classmethod
    def of(cls, summary, dtype: str | None = None, device: str | None = None) -> "Shape":
        s = summary if isinstance(summary, dict) else summary.as_dict()
        return cls(n_params=int(s["n_params"]), n_layers=int(s["n_layers"]), n_heads=int(s["n_heads"]),
                   n_kv_heads=int(s.get("n_kv_heads") or s["n_heads"]), d_model=int(s["d_model"]),
                   d_head=int(s["d_head"]), d_mlp=int(s.get("d_mlp") or 4 * s["d_model"]),
                   d_vocab=int(s["d_vocab"]), n_ctx=int(s["n_ctx"]),
                   itemsize=DTYPES[dtype or s["dtype"]].itemsize, device=device or s["device"],
                   gated="gated" in str(s.get("mlp", "")).lower(),
                   parallel="parallel" in str(s.get("block", "")))

    @property
    def weights(self) -> int:
        return self.n_params * self.itemsize

    @property
    def embed_params(self) -> int:
        return self.d_vocab * self.d_model

    # -- activations ---------------------------------------------------------------------------------------
    def block_bytes(self, rows: int, pos: int) -> int:
        """Peak of one block's forward (no gradients) for `rows` sequences of `pos` tokens: the residual and its
        norm, queries/keys/values and the attention output, the MLP's hidden layer (and its gate), and the
        attention scores and pattern (computed in float32)."""
        kv = self.n_kv_heads * self.d_head
        per_token = self.itemsize * (4 * self.d_model + self.n_heads * self.d_head + 2 * kv
                                     + (3 if self.gated else 2) * self.d_mlp)
        scores = F32 * 2 * self.n_heads * pos
        return rows * pos * (per_token + scores)

    def saved_bytes(self, rows: int, pos: int) -> int:
        """What one block keeps for the backward pass (every input of every product, norms, the pattern)."""
        kv = self.n_kv_heads * self.d_head
        per_token = self.itemsize * (6 * self.d_model + 2 * self.n_heads * self.d_head + 2 * kv
                                     + (4 if self.gated else 2) * self.d_mlp)
        return rows * pos * (per_token + F32 * 2 * self.n_heads * pos)

    def logits_bytes(self, rows: int, pos: int, float_copies: int = 1) -> int:
        """Logits for `rows` x `pos` positions (the model's dtype) and float32 copies (softmax, log-softmax)."""
        return rows * pos * self.d_vocab * (self.itemsize + F32 * float_copies)

    def forward_bytes(self, rows: int, pos: int, logits_pos: int | None = None, float_copies: int = 1) -> int:
        """Peak of a no-grad forward: one block at a time plus the logits (at every position unless told)."""
        lp = pos if logits_pos is None else logits_pos
        return self.block_bytes(rows, pos) + self.logits_bytes(rows, lp, float_copies)

    def backward_bytes(self, rows: int, pos: int, logits_pos: int | None = None) -> int:
        """Peak of a forward and backward through every block: all blocks' saved tensors, one block's gradients
        in flight, and the logits with their gradient."""
        lp = pos if logits_pos is None else logits_pos
        return (self.n_layers * self.saved_bytes(rows, pos) + 2 * self.block_bytes(rows, pos)
                + 2 * self.logits_bytes(rows, lp))

    def resid_bytes(self, rows: int, pos: int, n: int = 1, itemsize: int | None = None) -> int:
        """`n` residual-stream tensors [rows, pos, d_model]."""
        return n * rows * pos * self.d_model * (itemsize or self.itemsize)

    # -- work ----------------------------------------------------------------------------------------------
    def forward_flops(self, rows: int, pos: int, logits_pos: int | None = None) -> float:
        """Multiply-adds x 2 of a forward: the blocks' matrices, attention over the prefix, the unembedding."""
        lp = pos if logits_pos is None else logits_pos
        body = max(self.n_params - 2 * self.embed_params, self.n_params // 4)  # embedding lookups cost nothing
        attn = 2 * self.n_layers * pos * self.n_heads * self.d_head  # scores and weighted values, per token
        return 2.0 * rows * (pos * (body + attn) + lp * self.embed_params)

    def backward_flops(self, rows: int, pos: int, logits_pos: int | None = None) -> float:
        return 3.0 * self.forward_flops(rows, pos, logits_pos)


@dataclass
class Estimate:
    """Peak memory by part (bytes) and work (floating-point operations) of one run. `lower` names the setting
    that most reduces the peak; `tables` is the rows of what it returns (for the note)."""

    parts: dict[str, int]
    flops: float
    lower: str
    analysis: str = ""
    device: str = "cpu"
    extra_seconds: float = 0.0  # work that is not matrix products (eigendecompositions, scikit-learn fits)
    upstream: list["Estimate"] = field(default_factory=list)  # stored runs it builds on, when not stored yet
    seconds: float = field(default=0.0, init=False)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def working_bytes(self) -> int:
        """What the run needs beyond the loaded weights."""
        return self.total_bytes - int(self.parts.get("weights", 0))

    def describe(self) -> str:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items() if v >= 0.5 * MiB)
        text = f"≈ {fmt_bytes(self.total_bytes)} peak ({parts}) · ≈ {fmt_seconds(self.seconds)} on {self.device}"
        if self.upstream:
            text += f" (+ ≈ {fmt_seconds(upstream_seconds(self))} for the runs it builds on)"
        return text


def fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


def fmt_seconds(s: float) -> str:
    if s < 1:
        return "< 1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------------------------------------
# Throughput: measured once per (device, dtype, width); efficiency learnt from finished runs
# ----------------------------------------------------------------------------------------------------------
_THROUGHPUT: dict[tuple, float] = {}
_EFFICIENCY: dict[tuple, list[float]] = {}
_LOCK = threading.Lock()
DEFAULT_EFFICIENCY = 0.35  # a hooked forward's share of the matmul rate (measured on the default model, CPU)


def matmul_throughput(device: str, dtype: str, width: int) -> float:
    """Floating-point operations per second of [256, width] x [width, 4 width] products on this device."""
    key = (device, dtype, width)
    with _LOCK:
        if key in _THROUGHPUT:
            return _THROUGHPUT[key]
    dt = DTYPES[dtype]
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    a = torch.randn(256, width, dtype=dt, device=dev)
    b = torch.randn(width, 4 * width, dtype=dt, device=dev)
    flops, n = 2.0 * 256 * width * 4 * width, 0
    with torch.no_grad():
        a @ b  # warm up
        _sync(dev)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.05 or n < 3:
            a @ b
            n += 1
        _sync(dev)
        rate = flops * n / (time.perf_counter() - t0)
    with _LOCK:
        _THROUGHPUT[key] = rate
    return rate


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def efficiency(analysis: str, device: str) -> float:
    with _LOCK:
        seen = _EFFICIENCY.get((analysis, device))
        return statistics.median(seen) if seen else DEFAULT_EFFICIENCY


def learn(est: Estimate, dtype: str, width: int, seconds: float) -> None:
    """Remember how fast a finished run went against its estimated work (the next estimate's efficiency)."""
    work_s = seconds - est.extra_seconds
    rate = matmul_throughput(est.device, dtype, width)
    if est.flops <= 0 or work_s <= 0.05 or est.flops / (rate * DEFAULT_EFFICIENCY) < 0.5:
        return  # a short run's time is mostly fixed costs: it says little about the rate of a long one
    with _LOCK:
        seen = _EFFICIENCY.setdefault((est.analysis, est.device), [])
        seen.append(est.flops / work_s / rate)
        del seen[:-20]


def timed(est: Estimate, dtype: str, width: int) -> Estimate:
    """Fill in the seconds of the estimate and of the runs it builds on (each with theirs)."""
    throughput = matmul_throughput(est.device, dtype, width)

    def fill(e: Estimate) -> float:  # an input run at its own analysis's pace
        e.device = est.device
        e.seconds = e.flops / (throughput * efficiency(e.analysis or est.analysis, est.device)) + e.extra_seconds
        return e.seconds + sum(fill(u) for u in e.upstream)

    fill(est)
    return est


def input_estimate(estimate: Callable[["Plan"], Estimate], plan: "Plan") -> Estimate:
    """The estimate of a run this one builds on (`upstream`), named by its analysis so that it is timed at that
    analysis's pace and dropped when the store holds it."""
    est = estimate(plan)
    est.analysis = plan.spec.analysis
    return est


def upstream_seconds(est: Estimate) -> float:
    return sum(u.seconds + upstream_seconds(u) for u in est.upstream)


# ----------------------------------------------------------------------------------------------------------
# The plan an analysis estimates from
# ----------------------------------------------------------------------------------------------------------
TYPICAL_TEXT_TOKENS = 14  # a shipped concept sentence or IOI prompt, when no tokenizer is at hand


@dataclass
class Plan:
    """What an analysis's `estimate` reads: the model's shape, the spec, the loaded model when there is one (for
    token counts: without it, typical lengths of the shipped texts stand in) and its dataset (loaded on demand)."""

    shape: Shape
    spec: Any
    handle: Any = None
    dataset: Callable[[], Any] | None = None
    get_stored: Callable[[str], Any] | None = None  # an uploaded dataset by id (the store's), for concept counts
    _lengths: list[int] | None = None

    def concepts(self) -> list[str]:
        """The concept columns of the spec's concept dataset (the shipped one's when it cannot be read)."""
        from . import concept_data

        try:
            frame = concept_data.load(getattr(self.spec, "dataset", "shipped"), self.get_stored)
        except Exception:  # noqa: BLE001 - an estimate only; the run itself reports a bad dataset
            frame = concept_data.shipped()
        return concept_data.concept_columns(frame)

    def n_tokens(self) -> int:
        """Tokens of the spec's prompt: its ids, else the prompt tokenised (or guessed at 4 characters a token)."""
        ids = getattr(self.spec, "token_ids", ())
        if ids:
            return len(ids)
        prompt = getattr(self.spec, "prompt", "")
        if self.handle is not None:
            from .tokens import encode

            return max(1, len(encode(self.handle, prompt, self.spec.bos)))
        return max(1, len(prompt) // 4 + 1)

    def lengths(self, limit: int | None = None, drop_last: int = 0) -> list[int]:
        """Token lengths of the dataset's texts (the first `limit`), each cut by `drop_last`."""
        if self._lengths is None:
            frame = self.dataset() if self.dataset is not None else None
            if frame is None:
                self._lengths = [TYPICAL_TEXT_TOKENS] * (limit or 2000)
            else:
                self._lengths = self.text_lengths(frame["text"].iloc[:limit] if limit else frame["text"])
        out = [max(1, n - drop_last) for n in self._lengths]
        return out[:limit] if limit else out

    def text_lengths(self, texts) -> list[int]:
        """Token lengths of these texts for the model (typical lengths without a loaded model)."""
        if self.handle is None:
            return [TYPICAL_TEXT_TOKENS] * len(texts)
        from .tokens import encode_texts

        return [len(s) for s in encode_texts(self.handle, list(texts), 0, self.spec.bos)]


def other_models_bytes(plan: Plan, series: list) -> int:
    """Weights of the models of a checkpoint series that are not loaded yet: the model cache's free slots fill
    up, and once it is full a load holds one model more until the least recently used one is let go."""
    from .models import MODEL_CACHE

    spec, shape = plan.spec, plan.shape
    missing = sum(1 for c in series if not (c.name == spec.model and (c.revision or "") == spec.revision)
                  and not MODEL_CACHE.has(c.name, revision=c.revision, device=shape.device, dtype=spec.dtype))
    slots = max(0, MODEL_CACHE.max_models - len(MODEL_CACHE.loaded()))
    return int((min(missing, slots) + (missing > slots)) * shape.weights * 1.1)


def batches(lengths: list[int], batch: int = 64) -> list[tuple[int, int]]:
    """(rows, tokens) of each batch `session.cache_in_batches` runs: texts of one length, `batch` at a time."""
    by_len: dict[int, int] = {}
    for n in lengths:
        by_len[n] = by_len.get(n, 0) + 1
    return [(min(batch, count - c), n) for n, count in by_len.items() for c in range(0, count, batch)]


def largest(batch_list: list[tuple[int, int]], per: Callable[[int, int], int]) -> int:
    return max((per(r, n) for r, n in batch_list), default=0)


def estimate_run(analysis, spec, handle, get_stored: Callable[[str], Any] | None = None) -> Estimate | None:
    """The analysis's estimate for this spec (token ids resolved) on this loaded model (None when it declares
    none); `get_stored` reads an uploaded dataset the spec names."""
    if analysis.estimate is None:
        return None
    shape = Shape.of(handle.summary, spec.dtype, handle.device)
    est = _estimate(analysis, Plan(shape, spec, handle, dataset_loader(analysis, spec, get_stored), get_stored))
    return timed(est, spec.dtype, shape.d_model)


RUNNER_BYTES = 8 * MiB  # what every run adds besides its tensors: tables, the store's write, the interpreter


def _estimate(analysis, plan: Plan) -> Estimate:
    est = analysis.estimate(plan)
    est.analysis, est.device = plan.spec.analysis, plan.shape.device
    est.parts = {"weights": plan.shape.weights, **{k: int(v) for k, v in est.parts.items() if k != "weights"},
                 "tables and store": RUNNER_BYTES}
    return est


def dataset_loader(analysis, spec, get_stored) -> Callable[[], Any] | None:
    """Loads the dataset the spec names (the analysis's first Dataset input, or the concept dataset of one that
    builds on concept activations), for an estimate's text lengths."""
    from . import concept_data
    from .contract import Dataset

    for need in analysis.inputs:
        if isinstance(need, Dataset):
            return lambda: need.load(getattr(spec, need.field), get_stored)
    if "dataset" in spec.field_names() and "max_sentences" in spec.field_names():
        return lambda: concept_data.load(spec.dataset, get_stored)
    return None


# ----------------------------------------------------------------------------------------------------------
# Defaults that scale with the model
# ----------------------------------------------------------------------------------------------------------
REFERENCE_RATE = 80e9  # FLOP/s of a hooked forward on the reference machine (2 CPU cores, float32; measured on
# SmolLM2: 145e9 in batches of 64 texts, 68e9 training the tuned lens)
BUDGET_S = 50.0  # a page's default run on the reference machine, so it finishes inside a minute


def reference_seconds(est: Estimate, upstream: bool = True) -> float:
    """The run's time on the reference machine (deterministic: the same model gets the same defaults anywhere),
    with the runs it builds on."""
    own = est.flops / REFERENCE_RATE + est.extra_seconds
    return own + (sum(reference_seconds(u) for u in est.upstream) if upstream else 0.0)


def smaller_defaults(analysis, summary, base: dict, budget_s: float = BUDGET_S) -> tuple[dict, float, float]:
    """(settings, reference seconds of the defaults, of what was chosen): the first rung of the analysis's
    `smaller` ladder whose run takes at most `budget_s` on the reference machine, when the defaults take
    longer ({} when they do not). `base` holds the spec's fields as the page or command line has them."""
    if analysis.estimate is None or not analysis.smaller:
        return {}, 0.0, 0.0
    shape = Shape.of(summary, "float32", "cpu")

    def secs(fields: dict) -> float:
        spec = analysis.spec.from_dict({**base, **fields})
        return reference_seconds(_estimate(analysis, Plan(shape, spec)))

    full = secs({})
    if full <= budget_s:
        return {}, full, full
    chosen, t = {}, full
    for rung in analysis.smaller:
        rung = {k: v(shape) if callable(v) else v for k, v in rung.items()}  # e.g. layers spread over the model
        chosen, t = rung, secs(rung)
        if t <= budget_s:
            break
    return chosen, full, t


HEADROOM = 0.9  # of the free memory a run may plan to use


def check_fits(est: Estimate, free: int | None = None) -> None:
    """Refuse a run whose working memory does not fit the free memory of its device (the weights are already
    loaded), naming the setting to lower."""
    free = available_memory(est.device) if free is None else free
    if est.working_bytes > HEADROOM * free:
        raise WorkbenchError(
            f"This run needs about {fmt_bytes(est.working_bytes)} besides the model's weights, and "
            f"{est.device} has {fmt_bytes(free)} free ({est.describe()}).",
            hint=f"Lower {est.lower}, or pick bfloat16, a smaller model or a machine with more memory.")


def check_time(est: Estimate, limit_s: float) -> None:
    """Refuse a run whose estimated time (with the runs it builds on) is over `limit_s` (0: no limit)."""
    total = est.seconds + upstream_seconds(est)
    if limit_s and total > limit_s:
        raise WorkbenchError(
            f"This run is estimated at ≈ {fmt_seconds(total)} ({est.describe()}); this server runs at most "
            f"{fmt_seconds(limit_s)} per request, so that one request cannot hold the model for everyone.",
            hint=f"Lower {est.lower}, or run it from the command line (`python -m analysis batch`), which has no "
                 "limit.")


# ----------------------------------------------------------------------------------------------------------
# Measuring the real peak (tests and benchmarks)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Peak:
    extra_bytes: int = 0  # above what was in use when measuring began
    seconds: float = 0.0


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


@contextlib.contextmanager
def measure_peak(device: str = "cpu") -> Iterator[Peak]:
    """The peak memory of the code inside, above what was in use when it began. CPU: Linux only (resident
    high-water mark); freed heap memory is first handed back (malloc_trim) so reuse of it is not missed."""
    peak = Peak()
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        start = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to what is resident now
    t0 = time.perf_counter()
    try:
        yield peak
    finally:
        peak.seconds = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.synchronize()
            peak.extra_bytes = torch.cuda.max_memory_allocated() - start
        else:
            peak.extra_bytes = _status_kib("VmHWM") - start


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["Estimate", "Peak", "Plan", "Shape", "check_fits", "estimate_run", "fmt_bytes", "fmt_seconds", "learn",
           "measure_peak", "smaller_defaults"]

