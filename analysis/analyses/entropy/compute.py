"""Entropy tracking: how uncertain each attention head and each layer's prediction is, over depth and training.

Per model (the model itself, or each of a list of training checkpoints):
- attention entropy per head, normalised by the log of the number of keys each query sees under the causal mask
  (`kernels.entropy`); heads whose mean normalised entropy falls below `collapse_below` are flagged as collapsed;
- predictive entropy per token through the layers, from the logit lens at resid_post (`kernels.lens`); the
  tokens where the model's own final prediction is most uncertain (the top `1 - fork_quantile` of the prompt's
  positions) are flagged as forking tokens.

For the default model the shipped checkpoints (steps 100 ... 3000) and the final model (step 4000) are tracked
out of the box; any list of model folders, hub ids or `id@revision` entries can be given instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kernels.entropy import attention_entropy
from kernels.lens import lens_stats
from kernels.readout import output_transform

from ...errors import WorkbenchError
from ...estimate import Estimate, other_models_bytes, other_models_seconds
from ...models import checkpoint_series
from ...result import Result
from ...session import ModelSession
from ...specs import PromptSpec, param
from ...tokens import tokenize
from ..lens.compute import residual_rows

MAX_CHECKPOINTS = 32


@dataclass(frozen=True)
class EntropySpec(PromptSpec):
    """Attention and predictive entropy over one prompt, for a model or a series of checkpoints."""

    analysis: ClassVar[str] = "entropy"
    title: ClassVar[str] = "Entropy: attention entropy per head and predictive entropy per token, over training"
    checkpoints: tuple[str, ...] = param((), "models to track in training order (folders, hub ids, id@revision); "
                                              "empty: the default model's shipped checkpoints, or the model alone",
                                      max_len=MAX_CHECKPOINTS)
    collapse_below: float = param(0.1, "normalised attention entropy below which a head counts as collapsed",
                               min=0.0, max=1.0)
    fork_quantile: float = param(0.8, "positions whose final predictive entropy is above this quantile are "
                                   "forking tokens", min=0.0, max=1.0)


def series_sessions(session: ModelSession, spec, progress):
    """(checkpoint, session) for each model of the spec's checkpoint series, in the order given (the run's own
    model is not loaded twice); every model must share the run's vocabulary (the token ids are the run's).
    Reports the start of each model's part (its loading); the caller reports inside it."""
    series = checkpoint_series(spec.model, spec.revision, spec.checkpoints)
    for i, ckpt in enumerate(series):
        progress(i / len(series), f"model {i + 1} of {len(series)} ({ckpt.label}): loading")
        session.let_others_in()  # between checkpoints: a run waiting for the model may go first
        with session.other(ckpt.name, ckpt.revision, spec.dtype) as s:
            if s.summary.d_vocab != session.summary.d_vocab:
                raise WorkbenchError(f"{ckpt.label} has a vocabulary of {s.summary.d_vocab} tokens, the model "
                                     f"{session.summary.d_vocab}: they are not checkpoints of one model.",
                                     hint="Track checkpoints that share one tokenizer.")
            yield ckpt, s


def checkpoint_columns(ckpt) -> dict:
    """The columns that name a checkpoint in a series' tables: its label (what plots and pages show, in the
    order given) and its training step (NaN when unknown)."""
    return {"checkpoint": ckpt.label, "step": float("nan") if ckpt.step is None else ckpt.step}


def model_entropy(session: ModelSession, ids: list[int]) -> tuple[pd.DataFrame, np.ndarray]:
    """(heads table: layer, head, entropy, norm_entropy; predictive entropy [layer, pos] from the lens)."""
    bridge = session.bridge
    L = session.n_layers
    names = [session.hook("pattern", layer) for layer in range(L)]
    with torch.no_grad():
        _, cache = session.run_with_cache(session.tensor(ids), names)
        rows = []
        for layer in range(L):
            ent, norm = attention_entropy(cache[names[layer]][0])  # [H, Q]
            rows.append(pd.DataFrame({"layer": layer, "head": np.arange(ent.shape[0]),
                                      "entropy": ent.mean(-1).cpu().numpy(),
                                      "norm_entropy": torch.nanmean(norm, -1).cpu().numpy()}))
    keys, h, _, _ = residual_rows(session, ids, ("resid_post",))
    with torch.no_grad():
        st = lens_stats(bridge.ln_final(h), bridge.W_U, bridge.b_U, k=1, transform=output_transform(bridge))
    return pd.concat(rows, ignore_index=True), st.entropy.view(L, len(ids)).cpu().numpy()


def compute(session: ModelSession, spec: EntropySpec, inputs, progress) -> Result:
    ids = list(spec.token_ids)
    heads, tokens_rows, models = [], [], []
    n_models = len(checkpoint_series(spec.model, spec.revision, spec.checkpoints))
    with contextlib.closing(series_sessions(session, spec, progress)) as series:  # a failure releases the model
        for i, (ckpt, h) in enumerate(series):  # loading a checkpoint is about half of its part
            progress((i + 0.5) / n_models, f"model {i + 1} of {n_models} ({ckpt.label}): attention and lens")
            hd, pred = model_entropy(h, ids)
            for i, (k, v) in enumerate(checkpoint_columns(ckpt).items()):
                hd.insert(i, k, v)
            hd["collapsed"] = hd["norm_entropy"] < spec.collapse_below
            heads.append(hd)
            final = pred[-1]
            fork_cut = float(np.quantile(final, spec.fork_quantile))
            L, P = pred.shape
            tokens_rows.append(pd.DataFrame({**checkpoint_columns(ckpt), "layer": np.repeat(np.arange(L), P),
                                             "pos": np.tile(np.arange(P), L), "entropy": pred.reshape(-1),
                                             "forking": np.tile(final >= fork_cut, L) & (final.std() > 0)}))
            models.append({**checkpoint_columns(ckpt), "model": h.name, "revision": h.handle.revision or "",
                           "fingerprint": h.fingerprint})
    heads_t = pd.concat(heads, ignore_index=True)
    tok_t = pd.concat(tokens_rows, ignore_index=True)
    tok_df = tokenize(session, ids)
    tok_t["token"] = tok_df["token"].to_numpy()[tok_t["pos"].to_numpy()]
    by = ["checkpoint", "step"]
    summary = heads_t.groupby(by, sort=False, dropna=False).agg(mean_norm_entropy=("norm_entropy", "mean"),
                                                                collapsed_heads=("collapsed", "sum")).reset_index()
    last_layer = tok_t[tok_t["layer"] == tok_t["layer"].max()]
    summary["mean_predictive_entropy"] = last_layer.groupby("checkpoint", sort=False)["entropy"].mean() \
        .reindex(summary["checkpoint"]).to_numpy()
    progress(1.0, "done")
    return Result(table=heads_t, meta={"n_tokens": len(ids), "checkpoints": [m["checkpoint"] for m in models],
                                       "steps": [None if m["step"] != m["step"] else int(m["step"]) for m in models]},
                  extra={"tokens": tok_df, "predictive": tok_t, "over_training": summary,
                         "models": pd.DataFrame(models)})


def estimate(plan) -> Estimate:
    """Per model of the series: every layer's attention pattern cached, the prompt's residuals and the lens
    kernel's vocabulary blocks; the checkpoints' weights that are not loaded yet."""
    spec, s, P = plan.spec, plan.shape, plan.n_tokens()
    series = checkpoint_series(spec.model, spec.revision, spec.checkpoints)
    rows = s.n_layers * P
    vocab_block = min(s.d_vocab, 16384 if s.device == "cuda" else 8192)
    blocks = min((256 if s.device == "cuda" else 64) * 2**20 * 5 // 4, rows * vocab_block * 17)
    per_model = (s.forward_bytes(1, P) + 4 * s.n_layers * s.n_heads * P * P + s.resid_bytes(1, P, s.n_layers + 1)
                 + 3 * rows * s.d_model * 4 + blocks)
    return Estimate(parts={"checkpoints' weights": other_models_bytes(plan, series), "per model": per_model,
                           "tables": len(series) * (s.n_layers * s.n_heads + rows) * 200},
                    flops=len(series) * (2 * s.forward_flops(1, P) + 2.0 * rows * s.d_model * s.d_vocab
                                         + s.vocab_flops(rows, 20)),
                    blocks=len(series) * s.calls(3),  # two forwards and the lens statistics per model
                    extra_seconds=other_models_seconds(plan, series) + len(series) * s.n_layers * 1e-3,
                    lower="the prompt's length or the number of checkpoints")
