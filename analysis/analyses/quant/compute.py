"""Quantization sensitivity: which weight matrices tolerate fewer bits, measured and predicted (HAWQ-V2).

Evaluation set: text the model writes itself (sequences sampled from BOS at temperature 1 with a seed), so
damage is measured on the distribution the model knows. Units of weights (`weight_units`): every 2-d weight of the
model once (tied embedding/unembedding counted once; views of one matrix, such as the bridge's q/k/v split of
GPT-2's c_attn, belong to that matrix), with its layer and type.

Measured (`QuantSensitivitySpec`): each unit quantized alone (and each layer, and each matrix type across layers;
and the residual entering each block, per token), in every format; mean per-token KL(full || quantized), change of
the next-token loss and top-1 agreement with the full model. Sweeps start at the first block a unit touches: the
residual entering it is the full model's, recorded once (kernels.patching.BlockRunner), so earlier blocks are not
recomputed; the unembedding alone needs only the final norm and projection.

Predicted: per unit, the Hessian trace of the loss by Hutchinson's estimator (Rademacher v, Hv by double
backprop; one sample per unit per backprop), divided by the number of parameters, with its standard error and
95% interval (Student's t over the samples), drawing samples until every unit's standard error is within `tol` of
its trace (of a tenth of the mean |trace| for traces near zero, which no sample size pins down relatively), or
`max_samples`. Sensitivity Omega = (Tr(H)/n) * ||Q(W) - W||^2, and its Spearman rank correlation with the
measured KL per format.

Allocation (`QuantAllocationSpec`, built on the stored traces): each matrix's sensitivity is the upper end of its
trace's 95% interval (floored at the smallest positive upper end), so a noisy or negative estimate cannot make a
matrix look insensitive; units sorted by it; every non-decreasing assignment of the chosen formats (more
sensitive => at least as many bits) is scored by size and total Omega, giving the Pareto frontier. Omega is a
prediction, and at two bits a poor one (the errors leave the quadratic regime and interact), so the allocation
measures candidates: the lowest total Omega under the budget with every format, then with the fewest-bit formats
left out one by one, and each format alone. The one with the lowest KL on the traces' text that fits the budget is
chosen (a format alone is always a candidate, so on that text the pick is never worse than the best single format
that fits), and every candidate is measured again on held-out text the model samples with another seed.

The second-order model assumes a minimum (zero gradient) and a positive semi-definite Hessian; on text a language
model is not at a minimum and cross-entropy Hessians are indefinite, so a trace can come out negative. Negative
traces are reported as they are.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kernels.patching import BlockRunner
from kernels.quant import (
    WEIGHT_FORMATS,
    fake_quant_activation,
    fake_quant_weight,
    parse_format,
    sq_error,
    squared_error,
)

from ...errors import WorkbenchError
from ...estimate import Estimate, Plan, input_estimate
from ...result import Result
from ...session import ModelSession
from ...specs import Spec, param

TYPES = ("embed", "pos_embed", "attn_in", "attn_out", "mlp_in", "mlp_out", "unembed", "other")
DEFAULT_ACT_FORMATS = ("int8-channel", "int4-channel", "fp8_e4m3-channel")
ALLOC_FORMATS = ("int8-channel", "int4-g128", "int3-g128", "int2-g128")
MAX_ASSIGNMENTS = 2_000_000


@dataclass
class Unit:
    name: str
    layer: int  # -1: before the blocks (embeddings); n_layers: after them (unembedding)
    type: str
    weight: torch.nn.Parameter  # the matrix quantized (views of it follow)
    out_dim: int
    grads: list = field(default_factory=list)  # the parameters autograd sees for it (it, or its views)

    @property
    def n(self) -> int:
        return self.weight.numel()


def _clean(name: str) -> str:
    return name.replace("._original_component", "").replace("_original_component.", "")


def _type(name: str, module) -> str:
    n = name.lower()
    last = n.rsplit(".", 2)[-2] if n.endswith(".weight") else n
    if isinstance(module, torch.nn.Embedding) or last in ("wte", "embed_tokens", "embed_in", "wpe"):
        return "pos_embed" if last == "wpe" or "position" in last else "embed"
    if last in ("lm_head", "embed_out", "unembed"):
        return "unembed"
    if "attn" in n or "attention" in n:
        if last in ("o", "o_proj", "dense", "c_proj", "out_proj"):
            return "attn_out"
        return "attn_in"
    if "mlp" in n:
        if last in ("c_proj", "down_proj", "dense_4h_to_h", "fc_out", "out", "fc2"):
            return "mlp_out"
        return "mlp_in"
    return "other"


def weight_units(session: ModelSession) -> list[Unit]:
    """Every 2-d weight once, with its layer, type and output axis; views of one storage are one unit."""
    hf = session.bridge.original_model
    modules = dict(hf.named_modules())
    n_layers = session.n_layers
    by_storage: dict[int, list[tuple[str, torch.nn.Parameter, object]]] = {}
    for name, p in hf.named_parameters():  # tied parameters appear once
        if p.dim() != 2:
            continue
        by_storage.setdefault(p.untyped_storage().data_ptr(), []).append((name, p, modules[name.rsplit(".", 1)[0]]))
    # only weights the forward uses: the bridge can keep an unused copy beside the one it runs (NeoX's fused qkv)
    params = [p for group in by_storage.values() for _, p, _ in group]
    with session.trainable(params), torch.enable_grad():
        bos = session.tokenizer.bos_token_id or 0
        out = session.forward(session.tensor([bos, bos, bos]))
        grads = torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
    used = {id(p) for p, g in zip(params, grads) if g is not None}
    units = []
    for group in by_storage.values():
        if not any(id(p) in used for _, p, _ in group):
            continue
        name, p, module = max(group, key=lambda t: t[1].numel())
        if any(q.numel() == p.numel() and q is not p for _, q, _ in group):
            raise WorkbenchError(f"Two parameters share the storage of {_clean(name)}; cannot tell which to count.")
        clean = _clean(name)
        kind = _type(clean, module)
        m = re.search(r"\.(?:h|layers|layer|blocks)\.(\d+)\.", clean)
        layer = int(m.group(1)) if m else (n_layers if kind == "unembed" else -1)
        out_dim = 1 if type(module).__name__ == "Conv1D" else 0
        units.append(Unit(clean, layer, kind, p, out_dim, [q for _, q, _ in group if id(q) in used]))
    order = {t: i for i, t in enumerate(TYPES)}
    return sorted(units, key=lambda u: (u.layer, order[u.type], u.name))


def model_text(session: ModelSession, n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n_seqs, seq_len] token ids the model samples itself from BOS (temperature 1, seeded)."""
    bos = session.tokenizer.bos_token_id
    if bos is None:
        bos = session.tokenizer.eos_token_id or 0
    gen = torch.Generator().manual_seed(seed)
    toks = torch.full((n_seqs, 1), bos, dtype=torch.long, device=session.device)
    with torch.no_grad():
        for _ in range(seq_len - 1):
            probs = session.forward(toks)[:, -1].float().softmax(-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(session.device)
            toks = torch.cat([toks, nxt], 1)
    return toks


class Damage:
    """KL(full || quantized) per token, the change of the next-token loss and top-1 agreement."""

    def __init__(self, tokens: torch.Tensor, full_logits: torch.Tensor):
        self.tokens = tokens
        self.logp = full_logits.float().log_softmax(-1)
        self.p = self.logp.exp()
        self.top = self.logp.argmax(-1)
        self.loss = self._loss(self.logp)

    def _loss(self, logp: torch.Tensor) -> float:
        return float(-logp[:, :-1].gather(-1, self.tokens[:, 1:, None]).mean())

    def __call__(self, logits: torch.Tensor) -> dict[str, float]:
        logq = logits.float().log_softmax(-1)
        kl = (self.p * (self.logp - logq)).sum(-1)
        return {"kl": float(kl.mean()), "delta_loss": self._loss(logq) - self.loss,
                "top1_agreement": float((logq.argmax(-1) == self.top).float().mean())}


class QuantRunner:
    """Logits of the evaluation set with some units' weights (or the residual entering a block) quantized,
    recomputing only from the first block they touch."""

    def __init__(self, session: ModelSession, tokens: torch.Tensor):
        self.bridge = session.bridge
        self.tokens = tokens
        self.n_layers = session.n_layers
        self.runner = BlockRunner(self.bridge, tokens)
        with torch.no_grad():
            self.final_resid = self.runner.run(self.runner.inputs[self.n_layers - 1], self.n_layers - 1)
            self.full_logits = self._logits(self.final_resid)

    def _logits(self, final_resid):
        return self.runner.logits(final_resid, positions=torch.arange(self.tokens.shape[1]))

    def logits(self, units: list[Unit], fmt: dict[int, str] | str | None = None, act_layer: int | None = None,
               act_fmt: str | None = None, sq_errors: list | None = None) -> torch.Tensor:
        """Logits with `units` quantized (all in `fmt`, or unit index -> format) and/or the residual entering
        block `act_layer` quantized per token in `act_fmt`; ||Q(W) - W||^2 of each unit is appended to
        `sq_errors` when given. Weights are restored before returning."""
        saved = []
        try:
            with torch.no_grad():
                for i, u in enumerate(units):
                    f = fmt if isinstance(fmt, str) else fmt[i]
                    old = u.weight.detach().clone()
                    saved.append((u.weight, old))
                    u.weight.copy_(fake_quant_weight(old, f, u.out_dim))
                    if sq_errors is not None:
                        sq_errors.append(squared_error(u.weight, old))
                if not units and act_layer is None:
                    return self.full_logits
                start = min([u.layer for u in units] + ([act_layer] if act_layer is not None else []))
                if start < 0:
                    return self.bridge(self.tokens)
                if start >= self.n_layers:  # the unembedding alone
                    return self._logits(self.final_resid)
                x = self.runner.inputs[start]
                if act_layer is not None and act_layer == start:
                    x = fake_quant_activation(x, act_fmt)
                return self._logits(self.runner.run(x, start))
        finally:
            with torch.no_grad():
                for p, old in saved:
                    p.copy_(old)


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A vector of +-1 (each with probability 1/2) shaped and typed like `like`: eight signs from each random
    byte (drawing one integer per element and scaling it was half of Hutchinson's time on a 135 M model)."""
    n = like.numel()
    b = torch.randint(0, 256, ((n + 7) // 8,), generator=gen, dtype=torch.uint8)
    signs = ((b[:, None] >> _SHIFTS) & 1).reshape(-1)[:n]
    return signs.to(like.dtype).mul_(2).sub_(1).reshape(like.shape).to(like.device)


def hutchinson(session: ModelSession, tokens: torch.Tensor, units: list[Unit], tol: float, min_samples: int,
               max_samples: int, seed: int, progress=None) -> pd.DataFrame:
    """Per unit: Tr(H)/n of the mean next-token loss, its standard error and the samples drawn."""
    params = [p for u in units for p in u.grads]
    owner = [i for i, u in enumerate(units) for _ in u.grads]
    gen = torch.Generator().manual_seed(seed)
    with session.trainable(params), torch.enable_grad():
        logits = session.forward(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [j for j, g in enumerate(grads) if g is not None]
        samples: list[list[float]] = [[] for _ in units]
        for k in range(max_samples):
            vs = [rademacher(params[j], gen) for j in live]
            hv = torch.autograd.grad([grads[j] for j in live], [params[j] for j in live], grad_outputs=vs,
                                     retain_graph=True, allow_unused=True)
            per_unit = [0.0] * len(units)
            for j, v, h in zip(live, vs, hv):
                if h is not None:
                    per_unit[owner[j]] += float((v * h).sum())
            for i, s in enumerate(per_unit):
                samples[i].append(s)
            n = k + 1
            if progress:
                progress(n / max_samples, f"Hutchinson sample {n}")
            if n >= min(min_samples, max_samples):
                arr = np.asarray(samples)
                mean, se = arr.mean(1), arr.std(1, ddof=1) / math.sqrt(n)
                # within tol of its own trace, or (a trace near zero) of a tenth of the mean |trace|
                if np.all(se <= tol * np.maximum(np.abs(mean), 0.1 * np.abs(mean).mean())):
                    break
    arr = np.asarray(samples)
    n = arr.shape[1]
    half = t95(n)
    rows = []
    for i, u in enumerate(units):
        mean, se = float(arr[i].mean()), float(arr[i].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        rows.append({"unit": u.name, "layer": u.layer, "type": u.type, "n_params": u.n, "trace": mean,
                     "trace_se": se, "trace_per_param": mean / u.n, "trace_per_param_se": se / u.n,
                     "trace_per_param_low": (mean - half * se) / u.n, "trace_per_param_high": (mean + half * se) / u.n,
                     "samples": n})
    return pd.DataFrame(rows)


def t95(n: int) -> float:
    """Half-width of a two-sided 95% interval of a mean of n samples, in standard errors (Student's t with n - 1
    degrees of freedom: 2.20 at 12 samples, 1.98 at 100); infinite for one sample."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else math.inf


def _check_formats(formats, what="format") -> tuple[str, ...]:
    out = []
    for f in formats:
        try:
            out.append(parse_format(f).name)
        except ValueError as e:
            raise WorkbenchError(f"Unknown {what}: {e}") from e
    if not out:
        raise WorkbenchError(f"Pick at least one {what}.")
    return tuple(out)


@dataclass(frozen=True)
class HessianTracesSpec(Spec):
    """Tr(H)/n of the next-token loss per weight matrix (Hutchinson), on text the model samples itself."""

    analysis: ClassVar[str] = "quant_traces"
    title: ClassVar[str] = "Hessian traces per weight matrix (Hutchinson) on the model's own text"
    n_seqs: int = param(16, "sequences of the model's own text", min=1, max=512)
    seq_len: int = param(64, "tokens per sequence (with BOS)", min=4, max=2048)
    tol: float = param(0.1, "Hutchinson: stop when every standard error is within this fraction of its trace",
                    min=1e-4, max=1.0)
    min_samples: int = param(8, "Hutchinson: samples drawn at least (capped by max_samples)", min=2, max=10_000)
    max_samples: int = param(100, "Hutchinson: samples drawn at most", min=2, max=10_000)
    seed: int = param(0, "text sampling and Rademacher seed", min=0, max=2**31 - 1)

    def resolve(self, model):
        return check_seq_len(self, model)


TEXT_FIELDS = ("n_seqs", "seq_len", "tol", "min_samples", "max_samples", "seed")


def check_seq_len(spec, model):
    """A spec's seq_len against the model's context (else the sampler indexes past the position embedding)."""
    n_ctx = model.summary.n_ctx
    if spec.seq_len > n_ctx:
        raise WorkbenchError(f"seq_len {spec.seq_len} is beyond this model's context of {n_ctx} tokens.",
                             hint=f"Pick at most {n_ctx}.")
    return spec


def traces_spec(spec, inputs=None) -> HessianTracesSpec:
    """The traces a sensitivity sweep or an allocation builds on: the same text and Hutchinson settings (one
    stored run serves both, and every format and unit choice)."""
    return HessianTracesSpec(model=spec.model, revision=spec.revision, dtype=spec.dtype,
                             **{f: getattr(spec, f) for f in TEXT_FIELDS})


def compute_traces(session: ModelSession, spec: HessianTracesSpec, inputs, progress) -> Result:
    progress(0.0, "the model's own text")
    tokens = model_text(session, spec.n_seqs, spec.seq_len, spec.seed)
    units = weight_units(session)
    progress(0.1, "Hessian traces")
    traces = hutchinson(session, tokens, units, spec.tol, spec.min_samples, spec.max_samples, spec.seed,
                        progress=lambda frac, what: progress(0.1 + 0.89 * frac, what))
    return Result(table=traces, meta={"n_tokens": int(tokens.numel()),
                                      "hutchinson_samples": int(traces["samples"].iloc[0]), "n_units": len(units),
                                      "n_params": int(sum(u.n for u in units)),
                                      "negative_traces": int((traces["trace"] < 0).sum())},
                  extra={"tokens": pd.DataFrame({"seq": np.repeat(np.arange(tokens.shape[0]), tokens.shape[1]),
                                                 "token_id": tokens.cpu().reshape(-1).numpy()})})


def traces_text(session: ModelSession, traces) -> torch.Tensor:
    """The [n_seqs, seq_len] text a stored traces run was measured on."""
    t = traces.result.extra["tokens"]
    n = int(t["seq"].max()) + 1
    return torch.tensor(t["token_id"].to_numpy(), dtype=torch.long, device=session.device).reshape(n, -1)


@dataclass(frozen=True)
class QuantSensitivitySpec(Spec):
    """Quantize each weight matrix, layer and matrix type (and each block's input) alone; measure and predict."""

    analysis: ClassVar[str] = "quant_sensitivity"
    title: ClassVar[str] = "Quantization sensitivity: measured damage per matrix and format, and HAWQ-V2's prediction"
    formats: tuple[str, ...] = param(WEIGHT_FORMATS, "weight formats swept", max_len=64)
    activation_formats: tuple[str, ...] = param(DEFAULT_ACT_FORMATS, "formats for the residual entering each block, "
                                             "per token (empty: none)", max_len=16)
    units: tuple[str, ...] = param(("matrix", "layer", "type"), "what is quantized at a time",
                                choices=("matrix", "layer", "type"), max_len=3)
    n_seqs: int = param(16, "sequences of the model's own text", min=1, max=512)
    seq_len: int = param(64, "tokens per sequence (with BOS)", min=4, max=2048)
    tol: float = param(0.1, "Hutchinson: stop when every standard error is within this fraction of its trace",
                    min=1e-4, max=1.0)
    min_samples: int = param(8, "Hutchinson: samples drawn at least (capped by max_samples)", min=2, max=10_000)
    max_samples: int = param(100, "Hutchinson: samples drawn at most", min=2, max=10_000)
    seed: int = param(0, "text sampling and Rademacher seed", min=0, max=2**31 - 1)

    def validate(self) -> None:
        _check_formats(self.formats)
        if self.activation_formats:
            _check_formats(self.activation_formats, "activation format")

    def resolve(self, model):
        return check_seq_len(self, model)


def unit_groups(session: ModelSession, units: list[Unit], kinds) -> list[tuple[str, str, int, str, list[Unit]]]:
    """(kind, name, layer, type, units) for each matrix, layer and matrix type asked for."""
    groups = []
    if "matrix" in kinds:
        groups += [("matrix", u.name, u.layer, u.type, [u]) for u in units]
    if "layer" in kinds:
        for layer in range(session.n_layers):
            us = [u for u in units if u.layer == layer]
            if us:
                groups.append(("layer", f"layer {layer}", layer, "all", us))
    if "type" in kinds:
        for t in TYPES:
            us = [u for u in units if u.type == t]
            if us:
                groups.append(("type", t, min(u.layer for u in us), t, us))
    return groups


def measure_sweep(session: ModelSession, tokens: torch.Tensor, groups, formats, activation_formats=(),
                  progress=None) -> tuple[pd.DataFrame, float]:
    """Damage of each group alone in each format, and of each block's input in each activation format; also
    the full-precision loss."""
    qr = QuantRunner(session, tokens)
    damage = Damage(tokens, qr.full_logits)
    rows = []
    steps = len(groups) * len(formats) + session.n_layers * len(activation_formats)
    done = 0
    for kind, name, layer, typ, us in groups:
        n = sum(u.n for u in us)
        for f in formats:
            fmt = parse_format(f)
            bits = sum(fmt.bits_per_weight(tuple(u.weight.shape) if u.out_dim == 0 else
                                           tuple(u.weight.shape[::-1])) * u.n for u in us) / n
            errors: list[float] = []
            m = damage(qr.logits(us, f, sq_errors=errors))
            sq = sum(errors) if kind == "matrix" else float("nan")
            rows.append({"unit_kind": kind, "unit": name, "layer": layer, "type": typ, "format": f,
                         "n_params": n, "bits": bits, "sq_error": sq, **m})
            done += 1
            if progress:
                progress(done / steps, f"{name}, {f}")
            session.let_others_in()  # the weights are restored after each step: a waiting run may go first
    for layer in range(session.n_layers):
        for f in activation_formats:
            m = damage(qr.logits([], None, act_layer=layer, act_fmt=f))
            rows.append({"unit_kind": "activation", "unit": f"resid_pre {layer}", "layer": layer,
                         "type": "activation", "format": f, "n_params": 0,
                         "bits": float(parse_format(f).bits), "sq_error": float("nan"), **m})
            done += 1
            if progress:
                progress(done / steps, f"resid_pre {layer}, {f}")
    return pd.DataFrame(rows), damage.loss


def compute_sensitivity(session: ModelSession, spec: QuantSensitivitySpec, inputs, progress) -> Result:
    from scipy.stats import spearmanr

    formats = _check_formats(spec.formats)
    tokens = traces_text(session, inputs["traces"])
    traces = inputs["traces"].result.table
    units = weight_units(session)
    sweep, full_loss = measure_sweep(session, tokens, unit_groups(session, units, spec.units), formats,
                                     spec.activation_formats, progress=lambda frac, what: progress(0.98 * frac, what))
    mats = sweep[sweep["unit_kind"] == "matrix"].merge(traces[["unit", "trace_per_param"]], on="unit")
    mats["omega"] = mats["trace_per_param"] * mats["sq_error"]
    corr = []
    for f, g in mats.groupby("format", sort=False):
        rho = spearmanr(g["omega"], g["kl"]).statistic if g["kl"].nunique() > 1 else float("nan")
        corr.append({"format": f, "spearman": float(rho), "n_units": len(g)})
    return Result(table=sweep, meta={"n_tokens": int(tokens.numel()), "full_loss": full_loss,
                                     "hutchinson_samples": int(traces["samples"].iloc[0]),
                                     "n_units": len(units), "n_params": int(sum(u.n for u in units)),
                                     "negative_traces": int((traces["trace"] < 0).sum()),
                                     "traces_run": inputs["traces"].key},
                  extra={"traces": traces, "omega": mats[["unit", "layer", "type", "format", "omega", "kl",
                                                          "trace_per_param", "sq_error"]],
                         "correlation": pd.DataFrame(corr, columns=["format", "spearman", "n_units"]),
                         "tokens": pd.DataFrame({"seq": np.repeat(np.arange(tokens.shape[0]), tokens.shape[1]),
                                                 "token_id": tokens.cpu().reshape(-1).numpy()})})


@dataclass(frozen=True)
class QuantAllocationSpec(Spec):
    """Mixed-precision assignment under a size budget: candidates from HAWQ-V2's sensitivities (each trace's upper
    95% bound) and each format alone, measured; the lowest KL on the traces' text chosen, all measured on held-out
    text."""

    analysis: ClassVar[str] = "quant_allocation"
    title: ClassVar[str] = "Bit allocation: size against predicted damage, candidates measured, the best chosen"
    formats: tuple[str, ...] = param(ALLOC_FORMATS, "formats to assign (any order; sorted by bits)", max_len=8)
    budget_bits: float = param(4.5, "size budget: average bits per weight over the quantized matrices", min=1.0,
                            max=32.0)
    n_seqs: int = param(16, "as the sensitivity run", min=1, max=512)
    seq_len: int = param(64, "as the sensitivity run", min=4, max=2048)
    tol: float = param(0.1, "as the sensitivity run", min=1e-4, max=1.0)
    min_samples: int = param(8, "as the sensitivity run", min=2, max=10_000)
    max_samples: int = param(100, "as the sensitivity run", min=2, max=10_000)
    seed: int = param(0, "as the sensitivity run", min=0, max=2**31 - 1)

    def validate(self) -> None:
        _check_formats(self.formats)

    def resolve(self, model):
        return check_seq_len(self, model)


def monotone_assignments(m: int, k: int):
    """All splits of m units (sorted most sensitive first) into k consecutive runs, as the run boundaries
    [n_assign, k + 1] (level 0 = the most bits)."""
    n = math.comb(m + k - 1, k - 1)
    if n > MAX_ASSIGNMENTS:
        raise WorkbenchError(f"{m} matrices x {k} formats give {n:,} assignments to score; at most "
                             f"{MAX_ASSIGNMENTS:,}.", hint="Assign fewer formats.")
    cuts = np.array(list(itertools.combinations_with_replacement(range(m + 1), k - 1)), dtype=np.int64)
    cuts = cuts.reshape(-1, k - 1)
    return np.concatenate([np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), m, np.int64)], 1)


HELD_OUT_SEED = 1_000_003  # the held-out text is sampled with the spec's seed plus this (a stream no spec names)


def held_out_seed(seed: int) -> int:
    return seed + HELD_OUT_SEED


def sensitivity_bound(traces: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per matrix, the Tr(H)/n the allocation uses: the upper end of its estimate's 95% interval, so sampling
    noise can only make a matrix look more sensitive (keep more bits), never less; an upper end at or below zero
    (the curvature there is negative, where the second-order model says nothing) is floored at the smallest
    positive upper end among the matrices, i.e. counted as sensitive as the least sensitive matrix measured.
    Returns (bound, floored)."""
    high = traces["trace_per_param_high"].to_numpy(dtype=np.float64)
    positive = high[np.isfinite(high) & (high > 0)]
    floor = float(positive.min()) if len(positive) else 1e-12
    floored = ~(high > 0)  # NaN (a single sample) counts as unknown: floored too
    return np.where(floored, floor, high), floored


def compute_allocation(session: ModelSession, spec: QuantAllocationSpec, inputs, progress) -> Result:
    fmts = sorted({parse_format(f).name: parse_format(f) for f in _check_formats(spec.formats)}.values(),
                  key=lambda f: -f.bits)
    traces = inputs["traces"].result.table.set_index("unit")
    units = weight_units(session)
    traces = traces.loc[[u.name for u in units]]
    bound, floored = sensitivity_bound(traces)
    order = np.argsort(-bound, kind="stable")  # most sensitive first
    units = [units[i] for i in order]
    bound, floored, traces = bound[order], floored[order], traces.iloc[order]
    m = len(units)
    n = np.array([u.n for u in units], dtype=np.float64)
    progress(0.05, "quantization error of each matrix in each format")
    with torch.no_grad():  # ||Q(W) - W||^2
        sq = np.array([[sq_error(u.weight, f, u.out_dim) for f in fmts] for u in units])
    omega = bound[:, None] * sq
    bits = np.array([[f.bits_per_weight(tuple(u.weight.shape) if u.out_dim == 0 else tuple(u.weight.shape[::-1]))
                      for f in fmts] for u in units])
    bounds = monotone_assignments(m, len(fmts))
    cum_omega = np.vstack([np.zeros(len(fmts)), np.cumsum(omega, 0)])  # [m + 1, k]
    cum_bits = np.vstack([np.zeros(len(fmts)), np.cumsum(bits * n[:, None], 0)])
    k = np.arange(len(fmts))
    total_omega = (cum_omega[bounds[:, 1:], k] - cum_omega[bounds[:, :-1], k]).sum(1)
    size_bits = (cum_bits[bounds[:, 1:], k] - cum_bits[bounds[:, :-1], k]).sum(1)
    avg_bits = size_bits / n.sum()
    # the Pareto frontier: no other assignment is at most as large and has less total Omega
    idx = np.lexsort((total_omega, avg_bits))
    frontier, best = [], np.inf
    for i in idx:
        if total_omega[i] < best - 1e-15:
            frontier.append(i)
            best = total_omega[i]
    frontier = np.array(frontier)
    within = avg_bits <= spec.budget_bits + 1e-9
    if not within.any():
        raise WorkbenchError(f"No assignment fits {spec.budget_bits} bits per weight: the smallest format alone "
                             f"takes {avg_bits.min():.3f}.", hint="Raise the budget or add a smaller format.")

    # Candidates: the lowest predicted Omega under the budget with every format, then leaving out the fewest-bit
    # formats one by one (two-bit errors are far outside the quadratic regime Omega assumes), and each format
    # alone. Each is measured on the traces' text and the lowest KL that fits the budget is chosen.
    rows_ = np.arange(m)
    uniform = [(f"all {f.name}", np.full(m, j)) for j, f in enumerate(fmts)]
    seen = {tuple(lv) for _, lv in uniform}
    picks = []
    for low in range(len(fmts) - 1, 0, -1):  # formats 0..low allowed (bounds[low + 1] == m: none below low)
        ok = np.flatnonzero(within & (bounds[:, low + 1] == m))
        if not len(ok):
            continue
        i = ok[np.argmin(total_omega[ok])]
        lv = np.repeat(k, np.diff(bounds[i]))
        if tuple(lv) not in seen:
            seen.add(tuple(lv))
            picks.append(("lowest Ω, any format" if low == len(fmts) - 1 else f"lowest Ω, none below {fmts[low].name}",
                          lv))
    cands = picks + uniform
    pred = [float(omega[rows_, lv].sum()) for _, lv in cands]
    size = [float((bits[rows_, lv] * n).sum() / n.sum()) for _, lv in cands]
    fits = [s <= spec.budget_bits + 1e-9 for s in size]

    def measure(tokens, start, span, what) -> list[dict]:
        qr = QuantRunner(session, tokens)
        damage = Damage(tokens, qr.full_logits)
        out = []
        for c, (label, lv) in enumerate(cands):
            out.append(damage(qr.logits(units, {j: fmts[lv[j]].name for j in range(m)})))
            progress(start + span * (c + 1) / len(cands), f"{label}, {what}")
            session.let_others_in()  # the weights are restored after each candidate
        return out

    calibration = measure(traces_text(session, inputs["traces"]), 0.1, 0.35, "measured on the traces' text")
    eligible = [c for c in range(len(cands)) if fits[c]]
    chosen = min(eligible, key=lambda c: calibration[c]["kl"])
    progress(0.45, "held-out text")
    held_seed = held_out_seed(spec.seed)
    held = model_text(session, spec.n_seqs, spec.seq_len, held_seed)
    held_out = measure(held, 0.55, 0.45, "measured on held-out text")
    measured = pd.DataFrame({
        "assignment": [label for label, _ in cands], "avg_bits": size, "fits_budget": fits,
        "predicted_omega": pred, "kl_calibration": [d["kl"] for d in calibration],
        "kl_held_out": [d["kl"] for d in held_out], "delta_loss_held_out": [d["delta_loss"] for d in held_out],
        "top1_held_out": [d["top1_agreement"] for d in held_out], "chosen": np.arange(len(cands)) == chosen})
    lv = cands[chosen][1]
    table = pd.DataFrame({"unit": [u.name for u in units], "layer": [u.layer for u in units],
                          "type": [u.type for u in units], "n_params": [u.n for u in units],
                          "trace_per_param": traces["trace_per_param"].to_numpy(),
                          "trace_per_param_low": traces["trace_per_param_low"].to_numpy(),
                          "trace_per_param_high": traces["trace_per_param_high"].to_numpy(),
                          "sensitivity": bound, "floored": floored, "format": [fmts[c].name for c in lv],
                          "bits": bits[rows_, lv], "omega": omega[rows_, lv]})
    pareto = pd.DataFrame({"avg_bits": avg_bits[frontier], "total_omega": total_omega[frontier]})
    return Result(table=table, meta={"budget_bits": spec.budget_bits, "chosen": cands[chosen][0],
                                     "chosen_avg_bits": size[chosen], "chosen_omega": pred[chosen],
                                     "chosen_kl_calibration": calibration[chosen]["kl"],
                                     "chosen_kl_held_out": held_out[chosen]["kl"],
                                     "n_assignments": int(len(bounds)), "formats": [f.name for f in fmts],
                                     "n_floored": int(floored.sum()), "held_out_seed": held_seed,
                                     "n_tokens": int(held.numel()), "traces_run": inputs["traces"].key},
                  extra={"pareto": pareto, "measured": measured,
                         "held_out_tokens": pd.DataFrame({
                             "seq": np.repeat(np.arange(held.shape[0]), held.shape[1]),
                             "token_id": held.cpu().reshape(-1).numpy()})})


# ----------------------------------------------------------------------------------------------------------
# Memory and work before a run
# ----------------------------------------------------------------------------------------------------------
def _n_matrices(s) -> int:
    """Weight matrices quantized one at a time: attention's and the MLP's per block, the embedding and unembedding."""
    return s.n_layers * (7 if s.gated else 6) + 2


def _text_cost(s, n: int, t: int) -> tuple[int, float]:
    """The model's own text: sampled a token at a time, each step a forward of the prefix."""
    return s.forward_bytes(n, t, 1, 2), sum(s.forward_flops(n, k, 1) for k in range(1, t))


def _hutchinson_cost(s, n: int, t: int, samples: int) -> tuple[int, float]:
    """Gradients with their graph kept (every block's saved tensors twice over, the parameters' gradients and
    a Rademacher vector and Hessian-vector product per parameter); work: the gradient with its graph, then per
    sample a Hessian-vector product, which measures about one backward's work (benchmarks/estimates.py: counted
    as four, the traces' estimates were 2-4x over on the default model, SmolLM2 and the wide-vocabulary model)."""
    peak = 3 * s.backward_bytes(n, t) + 4 * s.weights + 2 * s.logits_bytes(n, t)
    return peak, s.backward_flops(n, t) + samples * s.backward_flops(n, t)


# seconds per parameter on the reference machine (2 CPU cores, float32) of work that is not matrix products,
# measured on SmolLM2-135M
QUANTIZE_S_PER_PARAM = 9e-9  # quantizing a weight (and restoring it, or its squared error), per format
UNITS_S_PER_PARAM = 8e-9  # finding the weights the forward uses: a backward with every weight's gradient
GRAPH_S_PER_PARAM = 6e-8  # Hutchinson: the loss's gradient with its graph kept, once
RADEMACHER_S_PER_PARAM = 2e-9  # Hutchinson: a random sign per parameter, per sample


def estimate_traces(plan) -> Estimate:
    """The model's own text, sampled a token at a time, and Hutchinson's Hessian-vector products: the graph of
    the gradient kept (its parameter-sized work once), and per sample a Rademacher vector and a product
    (the tolerance usually stops it between min_samples and max_samples)."""
    spec, s = plan.spec, plan.shape
    n, t = spec.n_seqs, spec.seq_len
    # every trace within tol of itself is rarely reached long before max_samples
    samples = spec.min_samples + 3 * max(0, spec.max_samples - spec.min_samples) // 4
    text_peak, text_flops = _text_cost(s, n, t)
    hutch_peak, hutch_flops = _hutchinson_cost(s, n, t, samples)
    return Estimate(parts={"Hessian traces": max(hutch_peak, text_peak)}, flops=text_flops + hutch_flops,
                    # the text a token at a time; the products (a Hessian-vector product passes each block about
                    # twice: counted six times, the traces' estimates were 2-4x over)
                    blocks=s.calls(t) + s.calls(3 + 2 * samples),
                    extra_seconds=s.n_params * (UNITS_S_PER_PARAM + GRAPH_S_PER_PARAM
                                                + samples * RADEMACHER_S_PER_PARAM),
                    lower="n_seqs, seq_len or max_samples")


def _largest_group(s, units) -> int:
    """Parameters quantized at once by the largest group of the unit kinds asked for."""
    per_layer_mlp_in = (2 if s.gated else 1) * s.d_model * s.d_mlp
    out = 0
    if "matrix" in units:
        out = max(out, s.embed_params, per_layer_mlp_in // (2 if s.gated else 1))
    if "layer" in units:
        out = max(out, (s.n_params - s.embed_params) // s.n_layers)
    if "type" in units:
        out = max(out, s.embed_params, s.n_layers * per_layer_mlp_in)
    return out


def estimate_sensitivity(plan) -> Estimate:
    """Every block's input recorded for the evaluation text, the full-precision log-probabilities and the
    quantized run's (float32, every position), a copy of the largest group's weights and the quantization's
    float32 temporaries of its largest matrix; work: each unit in each format reruns the model from its first
    block, each block input in each activation format from that block, and every weight is quantized once per
    format and unit kind; the Hessian traces it builds on when not stored yet."""
    spec, s = plan.spec, plan.shape
    n, t, L = spec.n_seqs, spec.seq_len, s.n_layers
    F = len(spec.formats)
    passes = 0.0  # full-forward equivalents
    if "matrix" in spec.units:
        passes += F * _n_matrices(s) * 0.5
    if "layer" in spec.units:
        passes += F * L * 0.5
    if "type" in spec.units:
        passes += F * 6
    passes += len(spec.activation_formats) * L * 0.5
    kinds = sum(k in spec.units for k in ("matrix", "layer", "type"))
    copies = s.itemsize * _largest_group(s, spec.units) + 3 * 4 * max(s.embed_params, s.d_model * s.d_mlp)
    sweep = s.resid_bytes(n, t, L + 1) + 5 * n * t * s.d_vocab * 4 + s.block_bytes(n, t) + copies
    upstream = input_estimate(estimate_traces, Plan(s, traces_spec(spec), plan.handle))
    return Estimate(parts={"sweep": sweep}, flops=passes * s.forward_flops(n, t) + s.vocab_flops(n * t, 4 * passes),
                    blocks=s.calls(1 + passes),
                    extra_seconds=s.n_params * (UNITS_S_PER_PARAM + F * kinds * QUANTIZE_S_PER_PARAM),
                    lower="n_seqs, seq_len, formats or units (matrix is the largest)", upstream=[upstream])


def estimate_allocation(plan) -> Estimate:
    """The evaluation text's recorded run and log-probabilities, each matrix quantized in each format, a
    quantized run per candidate (up to one lowest-Omega pick per format, and each format alone) on the traces'
    text and again on held-out text sampled a token at a time; the Hessian traces it builds on when not stored
    yet."""
    spec, s = plan.spec, plan.shape
    n, t, L = spec.n_seqs, spec.seq_len, s.n_layers
    sweep = s.resid_bytes(n, t, L + 1) + 5 * n * t * s.d_vocab * 4 + s.block_bytes(n, t) + 2 * s.weights
    upstream = input_estimate(estimate_traces, Plan(s, traces_spec(spec), plan.handle))
    F = len(spec.formats)
    text_peak, text_flops = _text_cost(s, n, t)
    candidates = 2 * F - 1  # picks without the fewest-bit formats, one by one, and each format alone
    runs = 2 * (1 + candidates)  # on each text, the full-precision run and each candidate's
    return Estimate(parts={"candidates": max(sweep, text_peak)},
                    flops=runs * (s.forward_flops(n, t) + s.vocab_flops(n * t, 4)) + text_flops,
                    blocks=s.calls(runs) + s.calls(t),  # and the held-out text, a token at a time
                    extra_seconds=s.n_params * (UNITS_S_PER_PARAM + (F + 2 * candidates) * QUANTIZE_S_PER_PARAM),
                    lower="n_seqs or seq_len", upstream=[upstream])
