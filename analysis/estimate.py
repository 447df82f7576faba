"""Memory and time before a run.

Each analysis declares `estimate(plan) -> Estimate`: its peak memory from the model's shape and dtype and the
spec (weights, the activations of its largest batch, the tensors it keeps, vocabulary blocks, what it returns),
and its work: floating-point operations of matrix products (`flops`), block invocations (`blocks`: every block a
forward or backward passes through costs a fixed time for its hooks, modules and kernel launches, whatever its
size: on a small model this is most of the time) and seconds of other work on the reference machine
(`extra_seconds`: scikit-learn fits, eigendecompositions). The runner refuses a run whose working memory does not
fit the free memory of its device, naming the setting to lower; the page shows the estimate beside its Run button.

    est = estimate_run(spec, handle, store=store)
    est.total_bytes, est.seconds, est.basis, est.describe()

Time is the work at this machine's pace, times what this analysis's finished runs on this machine say:

1. this machine's pace (`Speed`): FLOP/s of matrix products of the model's width and seconds per small operation,
   measured by a short probe and kept in the store (`speed_probes`); the median of the last few probes is used, so
   one noisy probe (another process busy on the CPU) does not set it, and a process whose store holds enough of
   them does not probe at all;
2. a correction per analysis and machine: the median of measured / predicted seconds over the analysis's recent
   finished runs on this machine (the store's `run_timings`, written with each run's result; those of the same
   model when there is one), so what the work model misses (a kernel faster than its FLOPs, Python loops, a
   library's fixed costs) is learnt from the runs themselves; an analysis with no run like this one yet takes the
   median of the other analyses' corrections (from two analyses on: the probe's pace is off by much the same
   factor for most of them), learnt from and applied to the work at the machine's pace only (not the fixed
   seconds an estimate counts for scikit-learn fits and the like, which the probe does not set).

`Estimate.basis` says which: "from 5 finished runs of patching on this machine", "from 14 finished runs of 6 other
analyses on this machine", or "from this machine's matrix-multiply probe" before any has finished. Defaults that
scale with the model (`smaller_defaults`) use the reference machine's pace instead (2 CPU cores, fixed numbers), so
the same model gets the same defaults, and the same run keys, anywhere.

Measured peaks (`measure_peak`, for tests and benchmarks): on CUDA the allocator's peak; on the CPU the process's
resident high-water mark (reset through /proc/self/clear_refs) above what was resident when the run began.
"""
from __future__ import annotations

import contextlib
import ctypes
import re
import socket
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


ENTRY_FLOPS = 60.0  # an element-wise pass over one float32 entry takes as long as this many FLOPs of products
LOGIT_PASSES = 8  # the logits of a forward: written, read back, copied to float32 (measured on a 25,600 vocabulary)
SHIPPED_CORPUS_TOKENS = 33_000  # the shipped task and concept sentences (training text of the tuned lens and SAEs)


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
    @property
    def block_params(self) -> int:
        """The weights one block multiplies by: attention's query, key, value and output projections and the MLP's
        matrices (from the dimensions, so a tied or untied, small or huge vocabulary does not enter it)."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attn + (3 if self.gated else 2) * self.d_model * self.d_mlp

    def block_passes(self, pos: int) -> float:
        """Element-wise passes over one float per token through one block: the MLP's activation (a dozen
        kernels over its hidden layer, the gate's product), the norms, residual adds and hook copies over the
        width, the attention scores' mask and softmax over the prefix."""
        return (15 if self.gated else 10) * self.d_mlp + 25 * self.d_model + 4 * self.n_heads * pos

    def forward_flops(self, rows: int, pos: int, logits_pos: int | None = None, layers: float | None = None) -> float:
        """The work of a forward of `rows` sequences of `pos` tokens, in FLOPs: multiply-adds x 2 of the blocks'
        matrices and of attention over the prefix, the unembedding at `logits_pos` positions of each (all unless
        told; the embedding is a lookup), and the blocks' element-wise work and the logits written (at
        ENTRY_FLOPS a pass). `layers`: blocks run (all unless told)."""
        lp = pos if logits_pos is None else logits_pos
        L = self.n_layers if layers is None else layers
        attn = 2 * pos * self.n_heads * self.d_head  # scores and weighted values, per token and block
        products = 2.0 * (pos * L * (self.block_params + attn) + lp * self.embed_params)
        passes = pos * L * self.block_passes(pos) + LOGIT_PASSES * lp * self.d_vocab
        return rows * (products + ENTRY_FLOPS * passes)

    def backward_flops(self, rows: int, pos: int, logits_pos: int | None = None) -> float:
        """A forward and a backward (twice the forward's products)."""
        return 3.0 * self.forward_flops(rows, pos, logits_pos)

    def vocab_flops(self, rows: float, passes: float = 1.0) -> float:
        """Element-wise work over the vocabulary of `rows` rows, `passes` times (a softmax or log-softmax and
        what reads it: a loss, a KL, entropies, top-k), as the matrix-product FLOPs that take as long. It is
        memory-bound and costs the same per entry whatever the width: on a model whose vocabulary is a hundred
        times its width it is much of the time."""
        return ENTRY_FLOPS * passes * rows * self.d_vocab

    def calls(self, n: float = 1, layers: float | None = None) -> float:
        """Block invocations of `n` forwards through `layers` blocks (all unless told); the embedding and the
        unembedding count as one each. A backward counts as two forwards."""
        return n * ((self.n_layers if layers is None else layers) + 2)

    def batched_calls(self, lengths: list[int], batch: int = 64) -> float:
        """Block invocations of running texts of these lengths in batches of one length (`batches`)."""
        return self.calls(len(batches(lengths, batch)))


@dataclass
class Estimate:
    """Peak memory by part (bytes) and work of one run: matrix products (`flops`), block invocations (`blocks`,
    see Shape.calls) and other work in seconds on the reference machine (`extra_seconds`). `lower` names the
    setting that most reduces the peak; `upstream` the stored runs it builds on, when not stored yet.

    Timed (`timed`): `base_seconds` is the work at this machine's pace, `correction` what this analysis's finished
    runs here say of that pace, `seconds` the two multiplied, and `basis` says where the figure comes from."""

    parts: dict[str, int]
    flops: float
    lower: str
    analysis: str = ""
    device: str = "cpu"
    extra_seconds: float = 0.0  # work that is not matrix products (eigendecompositions, scikit-learn fits)
    upstream: list["Estimate"] = field(default_factory=list)  # stored runs it builds on, when not stored yet
    input: str = ""  # the input this upstream estimate stands for, where several inputs share one analysis
    blocks: float = 0.0  # block invocations: the fixed cost of each, whatever its size
    block_bytes: float = 0.0  # weights one block invocation reads (filled in from the model's shape)
    seconds: float = field(default=0.0, init=False)
    base_seconds: float = field(default=0.0, init=False)
    correction: float = field(default=1.0, init=False)
    basis: str = field(default="", init=False)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def working_bytes(self) -> int:
        """What the run needs beyond the loaded weights."""
        return self.total_bytes - int(self.parts.get("weights", 0))

    @property
    def total_seconds(self) -> float:
        """With the runs it builds on."""
        return self.seconds + upstream_seconds(self)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items() if v >= 0.5 * MiB)
        text = f"≈ {fmt_bytes(self.total_bytes)} peak ({parts}) · ≈ {fmt_seconds(self.seconds)} on {self.device}"
        if self.basis:
            text += f", {self.basis}"
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
# Time: this machine's pace (probed, kept in the store), corrected by the analysis's finished runs
# ----------------------------------------------------------------------------------------------------------
# The reference machine: 2 CPU cores, float32 (the team's CPU box), measured with benchmarks/estimates.py.
REFERENCE_RATE = 80e9  # FLOP/s of a hooked forward's matrix products
REFERENCE_BLOCK_S = 1.5e-3  # seconds of fixed cost per block invocation (hooks, modules, Python)
REFERENCE_BYTES_PER_S = 8e9  # reading a block's weights: what a forward of a few tokens waits for
# A hooked forward against the probe: its products reach this share of the probe's matrix-multiply rate, one
# block invocation costs this many of the probe's small operations, and its weights are read at this share of
# the probe's copy rate (measured on the reference machine).
FORWARD_EFFICIENCY = 0.6
OPS_PER_BLOCK = 700.0
BANDWIDTH_EFFICIENCY = 0.5
PROBES_KEPT = 9  # the median of this machine's last few probes is its pace
PROBES_ENOUGH = 5  # a process whose store holds this many probes of its pace does not probe again
RUNS_KEPT = 9  # the correction is the median over an analysis's last few finished runs on the machine
MIN_RUN_SECONDS = 0.5  # a shorter run (measured and predicted) is mostly fixed costs: it says little of the pace
RUNS_ALIKE = 4.0  # only runs predicted within this factor of the one estimated correct it
RUN_S = 0.02  # what every run costs besides its work: the session, tokenising, the result's tables


@dataclass(frozen=True)
class Speed:
    """How fast a machine does the work an estimate counts."""

    flops_per_s: float  # matrix products (and element-wise work, counted in their time) inside a hooked forward
    block_s: float  # the fixed cost of one block invocation
    bytes_per_s: float  # reading weights (once per block invocation, however few tokens it runs)

    def seconds(self, est: Estimate) -> float:
        per_block = self.block_s + est.block_bytes / self.bytes_per_s
        return RUN_S + est.flops / self.flops_per_s + est.blocks * per_block + est.extra_seconds


REFERENCE = Speed(REFERENCE_RATE, REFERENCE_BLOCK_S, REFERENCE_BYTES_PER_S)
_PROBED: dict[tuple, tuple[float, float, float]] = {}
_LOCK = threading.Lock()


def machine_id(device: str) -> str:
    """This machine as the store's pace tables name it: host, device and the threads torch uses."""
    what = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"
    return f"{socket.gethostname()} · {what} · {torch.get_num_threads()} threads"


def probe_width(device: str, width: int) -> int:
    """The width the probe multiplies at: the model's, within what a short probe can do on this device."""
    return max(64, min(width, 8192 if device == "cuda" else 1024))


def probe(device: str, dtype: str, width: int) -> tuple[float, float, float]:
    """(FLOP/s, seconds per small operation, bytes/s) of this device, measured once per process: [512, w] x
    [w, 4w] products, a run of small operations on [8, 64] tensors (what each hook, module and kernel launch
    costs whatever its size) and a 32 MiB copy; each the fastest of a few after a warm-up (the machine's pace,
    not a moment's interruption)."""
    w = probe_width(device, width)
    key = (device, dtype, w)
    with _LOCK:
        if key in _PROBED:
            return _PROBED[key]
    dt = DTYPES[dtype]
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    a = torch.randn(512, w, dtype=dt, device=dev)
    b = torch.randn(w, 4 * w, dtype=dt, device=dev)
    x, y = torch.randn(8, 64, dtype=dt, device=dev), torch.randn(8, 64, dtype=dt, device=dev)
    src = torch.ones(8 * 2**20, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)

    def fastest(fn, n: int) -> float:
        fn()  # warm up
        _sync(dev)
        best = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        return best

    def small_ops():
        z = y
        for _ in range(50):
            z = (x + z) * 0.5

    with torch.no_grad():
        rate = 2.0 * 512 * w * 4 * w / fastest(lambda: a @ b, 5)
        ops = fastest(small_ops, 3) / 100
        bw = 2.0 * src.numel() * 4 / fastest(lambda: dst.copy_(src), 5)
    with _LOCK:
        _PROBED[key] = (rate, ops, bw)
    return rate, ops, bw


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def speed_of(probes: list[tuple[float, float, float]]) -> Speed:
    """A hooked forward's pace on a machine whose probes gave these (the median of each)."""
    return Speed(FORWARD_EFFICIENCY * statistics.median(p[0] for p in probes),
                 OPS_PER_BLOCK * statistics.median(p[1] for p in probes),
                 BANDWIDTH_EFFICIENCY * statistics.median(p[2] for p in probes))


@dataclass
class Pace:
    """What is known of this machine's pace: its speed (the median of its probes) and its finished runs."""

    machine: str
    speed: Speed
    n_probes: int
    runs: list[dict] = field(default_factory=list)  # analysis, model, measured_s, predicted_s; newest first

    def correction(self, analysis: str, model: str = "", predicted: float = 0.0) -> tuple[float, str, bool]:
        """(measured / predicted, basis, whole): the median over this analysis's recent finished runs on this
        machine of a size like this one's (predicted within RUNS_ALIKE times `predicted`: a run a hundred times
        smaller is mostly fixed costs and says little of this one's pace), those of this model when it has one
        (another model's pace in the same analysis can differ by 3x: SmolLM2's probes against a wide-vocabulary
        model's); else the machine's pace from its other analyses (`_machine_correction`); or (1, the probe) when
        too few have finished. `whole`: the ratio corrects the whole estimate (learnt from runs of this analysis,
        fixed seconds included), not only the part at the machine's pace."""
        mine = [r for r in self.runs if r["analysis"] == analysis and r["predicted_s"] > 0
                and max(r["measured_s"], r["predicted_s"]) >= MIN_RUN_SECONDS
                and (predicted <= 0 or predicted / RUNS_ALIKE <= r["predicted_s"] <= predicted * RUNS_ALIKE)]
        same = [r for r in mine if model and r["model"] == model]
        by_model = len(same) >= 1
        use = (same if by_model else mine)[:RUNS_KEPT]
        if not use:
            return self._machine_correction(analysis)
        ratio = statistics.median(min(100.0, max(0.01, r["measured_s"] / r["predicted_s"])) for r in use)
        n = len(use)
        which = " with this model" if by_model else ""
        return ratio, f"from {n} finished run{'s' if n > 1 else ''} of {analysis}{which} on this machine", True

    def _machine_correction(self, analysis: str) -> tuple[float, str, bool]:
        """For an analysis with no finished run like this one: the machine's pace as its other analyses' finished
        runs found it, where at least MACHINE_ANALYSES analyses have finished — the probe's pace is off by the same
        factor for most analyses on a machine (1.5-2x slow on the 2-core box); else (1, the probe). Only the
        runs' work at the machine's pace tells of it: a run mostly of fixed seconds (scikit-learn fits, counted on
        the reference machine) is left out, and the rest count measured less fixed against predicted less fixed;
        the ratio then corrects only the estimate's own work at the machine's pace (`whole` False). Each
        analysis's median over its recent runs, then the median of those."""
        per: dict[str, list[float]] = {}
        for r in self.runs:
            fixed = r.get("extra_s", 0.0) or 0.0
            paced = r["predicted_s"] - fixed
            if r["analysis"] != analysis and paced > 0 and paced >= PACED_SHARE * r["predicted_s"] and \
                    max(r["measured_s"], r["predicted_s"]) >= MIN_RUN_SECONDS:
                per.setdefault(r["analysis"], []).append(min(100.0, max(0.01, (r["measured_s"] - fixed) / paced)))
        if len(per) < MACHINE_ANALYSES:
            probes = "probe" if self.n_probes <= 1 else f"{self.n_probes} probes"
            return 1.0, f"from this machine's matrix-multiply {probes} (no finished {analysis} runs here yet)", True
        ratio = statistics.median(statistics.median(v[:RUNS_KEPT]) for v in per.values())
        n = sum(min(len(v), RUNS_KEPT) for v in per.values())
        return ratio, (f"from {n} finished runs of {len(per)} other analyses on this machine (no {analysis} run "
                       "like this one here yet)"), False


MACHINE_ANALYSES = 2  # other analyses with finished runs before their pace corrects an analysis with none
PACED_SHARE = 0.5  # a run tells the machine's pace when at least this share of its prediction is at that pace


def machine_pace(device: str, dtype: str, width: int, store=None) -> Pace:
    """This machine's pace for a model of this width: the store's probes of it (this process's own added while
    the store holds fewer than PROBES_ENOUGH) and its finished runs; without a store, this process's probe."""
    m, w = machine_id(device), probe_width(device, width)
    probes = store.speed_probes(m, dtype, w, PROBES_KEPT) if store is not None else []
    if len(probes) < PROBES_ENOUGH:
        fresh = (device, dtype, w) not in _PROBED
        got = probe(device, dtype, w)
        if fresh and store is not None and not store.read_only:
            store.record_speed_probe(m, dtype, w, *got)
            probes = [got, *probes][:PROBES_KEPT]
        elif not probes:
            probes = [got]
    speed = speed_of(probes)
    runs = store.run_timings(m) if store is not None else []
    return Pace(m, speed, len(probes), runs)


def timed(est: Estimate, dtype: str, width: int, store=None, model: str = "") -> Estimate:
    """Fill in the seconds of the estimate and of the runs it builds on (each at its own analysis's pace), with
    their basis."""
    pace = machine_pace(est.device, dtype, width, store)

    def fill(e: Estimate) -> float:
        e.device = est.device
        e.base_seconds = pace.speed.seconds(e)
        e.correction, e.basis, whole = pace.correction(e.analysis or est.analysis, model, e.base_seconds)
        fixed = 0.0 if whole else min(e.extra_seconds, e.base_seconds)  # seconds the machine's pace does not set
        e.seconds = (e.base_seconds - fixed) * e.correction + fixed
        return e.seconds + sum(fill(u) for u in e.upstream)

    fill(est)
    return est


def timing_meta(est: Estimate, seconds: float, model: str, dtype: str, width: int, clean: bool) -> dict:
    """What a finished run tells of this machine's pace, kept with its result (Store.put files it under
    run_timings): its predicted seconds at the machine's speed, before any correction, against what it took.
    `clean`: nothing else ran on the model meanwhile (waiting for it, or a run let in between two parts, would
    count another run's time)."""
    return {"machine": machine_id(est.device), "analysis": est.analysis, "model": model, "dtype": dtype,
            "width": int(width), "flops": float(est.flops), "blocks": float(est.blocks),
            "extra_s": float(est.extra_seconds), "predicted_s": float(est.base_seconds), "measured_s": float(seconds),
            "clean": bool(clean)}


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
_LENGTHS: dict[tuple, list[int]] = {}  # token lengths of texts, per (tokenizer, bos, texts)


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
        """Token lengths of these texts for the model (typical lengths without a loaded model); remembered per
        tokenizer and texts, since a page estimates on every view and tokenising thousands of texts takes seconds."""
        if self.handle is None:
            return [TYPICAL_TEXT_TOKENS] * len(texts)
        import hashlib

        from .tokens import encode_texts

        texts = [str(t) for t in texts]
        key = (self.handle.fingerprint, str(self.spec.bos), hashlib.sha256("\0".join(texts).encode()).hexdigest())
        with _LOCK:
            got = _LENGTHS.get(key)
        if got is None:
            got = [len(s) for s in encode_texts(self.handle, texts, 0, self.spec.bos)]
            with _LOCK:
                if len(_LENGTHS) >= 64:
                    _LENGTHS.pop(next(iter(_LENGTHS)))
                _LENGTHS[key] = got
        return list(got)


def other_models_bytes(plan: Plan, series: list) -> int:
    """Weights of the models of a checkpoint series that are not loaded yet: the model cache's free slots fill
    up, and once it is full a load holds one model more until the least recently used one is let go."""
    from .models import MODEL_CACHE

    spec, shape = plan.spec, plan.shape
    missing = sum(1 for c in series if not (c.name == spec.model and (c.revision or "") == spec.revision)
                  and not MODEL_CACHE.has(c.name, revision=c.revision, device=shape.device, dtype=spec.dtype))
    slots = max(0, MODEL_CACHE.max_models - len(MODEL_CACHE.loaded()))
    return int((min(missing, slots) + (missing > slots)) * shape.weights * 1.1)


MODEL_LOAD_S = 0.5  # loading a model: building its bridge (seconds on the reference machine) ...
MODEL_LOAD_S_PER_PARAM = 5e-8  # ... and reading its weights


def other_models_seconds(plan: Plan, series: list) -> float:
    """Loading the models of a checkpoint series that are not loaded yet."""
    from .models import MODEL_CACHE

    spec, shape = plan.spec, plan.shape
    missing = sum(1 for c in series if not (c.name == spec.model and (c.revision or "") == spec.revision)
                  and not MODEL_CACHE.has(c.name, revision=c.revision, device=shape.device, dtype=spec.dtype))
    return missing * (MODEL_LOAD_S + MODEL_LOAD_S_PER_PARAM * shape.n_params)


def batches(lengths: list[int], batch: int = 64) -> list[tuple[int, int]]:
    """(rows, tokens) of each batch `session.cache_in_batches` runs: texts of one length, `batch` at a time."""
    by_len: dict[int, int] = {}
    for n in lengths:
        by_len[n] = by_len.get(n, 0) + 1
    return [(min(batch, count - c), n) for n, count in by_len.items() for c in range(0, count, batch)]


def largest(batch_list: list[tuple[int, int]], per: Callable[[int, int], int]) -> int:
    return max((per(r, n) for r, n in batch_list), default=0)


def estimate_run(analysis, spec, handle, get_stored: Callable[[str], Any] | None = None, *,
                 store=None) -> Estimate | None:
    """The analysis's estimate for this spec (token ids resolved) on this loaded model (None when it declares
    none); `get_stored` reads an uploaded dataset the spec names (default: the store's); `store` holds this
    machine's pace (without one, this process's probe alone)."""
    if analysis.estimate is None:
        return None
    if get_stored is None and store is not None:
        get_stored = store.get_dataset
    shape = Shape.of(handle.summary, spec.dtype, handle.device)
    est = _estimate(analysis, Plan(shape, spec, handle, dataset_loader(analysis, spec, get_stored), get_stored))
    return timed(est, spec.dtype, shape.d_model, store, handle.fingerprint)


RUNNER_BYTES = 8 * MiB  # what every run adds besides its tensors: tables, the store's write, the interpreter


def _estimate(analysis, plan: Plan) -> Estimate:
    est = analysis.estimate(plan)
    est.analysis, est.device = plan.spec.analysis, plan.shape.device
    per_block = plan.shape.weights / (plan.shape.n_layers + 2)  # a block, or the embedding or unembedding

    def fill(e: Estimate) -> None:
        e.block_bytes = e.block_bytes or per_block
        for u in e.upstream:
            fill(u)

    fill(est)
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
BUDGET_S = 50.0  # a page's default run on the reference machine, so it finishes inside a minute


def reference_seconds(est: Estimate, upstream: bool = True) -> float:
    """The run's time on the reference machine (deterministic: the same model gets the same defaults anywhere),
    with the runs it builds on."""
    own = REFERENCE.seconds(est)
    return own + (sum(reference_seconds(u) for u in est.upstream) if upstream else 0.0)


def smaller_defaults(analysis, summary, base: dict, budget_s: float | None = None,
                     keep: set[str] | frozenset = frozenset()) -> tuple[dict, float, float]:
    """(settings, reference seconds of the defaults, of what was chosen): the first rung of the analysis's
    `smaller` ladder whose run takes at most `budget_s` on the reference machine, when the defaults take
    longer ({} when they do not); the last rung when none does. `base` holds the spec's fields as the page or
    command line has them; `keep` names those of them a rung never changes (what the user gave), and each rung is
    estimated as it would run, with them. A rung estimated no faster than the defaults is never chosen (a ladder
    only goes down; tests/test_estimate.py checks every shipped ladder is monotone)."""
    if analysis.estimate is None or not analysis.smaller:
        return {}, 0.0, 0.0
    budget_s = BUDGET_S if budget_s is None else budget_s
    shape = Shape.of(summary, "float32", "cpu")

    def secs(fields: dict) -> float:
        spec = analysis.spec.from_dict({**base, **{k: v for k, v in fields.items() if k not in keep}})
        return reference_seconds(_estimate(analysis, Plan(shape, spec)))

    full = secs({})
    if full <= budget_s:
        return {}, full, full
    chosen, took = {}, full
    for rung in ladder(analysis, shape):
        t = secs(rung)
        if t >= full:
            continue
        chosen, took = rung, t
        if t <= budget_s:
            break
    return chosen, full, took


def ladder(analysis, shape: Shape) -> list[dict]:
    """The analysis's `smaller` rungs for a model of this shape (a callable value picks for it: layers spread
    over the model)."""
    return [{k: v(shape) if callable(v) else v for k, v in rung.items()} for rung in analysis.smaller]


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
    total = est.total_seconds
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


__all__ = ["Estimate", "Pace", "Peak", "Plan", "Shape", "Speed", "check_fits", "estimate_run", "fmt_bytes",
           "fmt_seconds", "machine_pace", "measure_peak", "smaller_defaults", "timing_meta"]

