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

import json
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kernels.entropy import attention_entropy
from kernels.lens import lens_stats

from .errors import WorkbenchError
from .models import DATA_DIR, DEFAULT_MODEL, ModelHandle, list_checkpoints, load_model
from .specs import PromptSpec, _f
from .store import Result

MAX_CHECKPOINTS = 32


@dataclass(frozen=True)
class EntropySpec(PromptSpec):
    """Attention and predictive entropy over one prompt, for a model or a series of checkpoints."""

    analysis: ClassVar[str] = "entropy"
    title: ClassVar[str] = "Entropy: attention entropy per head and predictive entropy per token, over training"
    checkpoints: tuple[str, ...] = _f((), "models to track in training order (folders, hub ids, id@revision); empty: "
                                          "the default model's shipped checkpoints, or the model alone",
                                      max_len=MAX_CHECKPOINTS)
    collapse_below: float = _f(0.1, "normalised attention entropy below which a head counts as collapsed",
                               min=0.0, max=1.0)
    fork_quantile: float = _f(0.8, "positions whose final predictive entropy is above this quantile are "
                                   "forking tokens", min=0.0, max=1.0)


def _series(spec: EntropySpec) -> list[tuple[int, str, str | None]]:
    """(step, model name, revision) in training order."""
    if spec.checkpoints:
        out = []
        for i, entry in enumerate(spec.checkpoints):
            name, _, rev = entry.partition("@")
            m = re.search(r"step[-_]?(\d+)", entry)
            out.append((int(m.group(1)) if m else i, name.strip(), rev.strip() or None))
        return out
    if spec.model == DEFAULT_MODEL and not spec.revision:
        final_step = json.loads((DATA_DIR / "default-model" / "training.json").read_text()).get("final_step", 0)
        return [(step, str(path), None) for step, path in list_checkpoints()] + [(int(final_step), DEFAULT_MODEL,
                                                                                  None)]
    return [(0, spec.model, spec.revision or None)]


def series_models(handle: ModelHandle, spec, series, progress):
    """(step, handle) for each model of the series, in order; the run's own model is not loaded twice, and every
    model must share the run's vocabulary (the token ids are the run's)."""
    for i, (step, name, rev) in enumerate(series):
        progress(i / len(series), f"model {i + 1} of {len(series)} (step {step})")
        h = handle if (name == spec.model and (rev or "") == (spec.revision or "")) else \
            load_model(name, revision=rev, device=handle.device, dtype=spec.dtype)
        if h.summary.d_vocab != handle.summary.d_vocab:
            raise WorkbenchError(f"{name} has a vocabulary of {h.summary.d_vocab} tokens, the model "
                                 f"{handle.summary.d_vocab}: they are not checkpoints of one model.",
                                 hint="Track checkpoints that share one tokenizer.")
        yield step, h


def model_entropy(handle: ModelHandle, ids: list[int]) -> tuple[pd.DataFrame, np.ndarray]:
    """(heads table: layer, head, entropy, norm_entropy; predictive entropy [layer, pos] from the lens)."""
    from .lens import residual_rows

    bridge = handle.bridge
    L = bridge.cfg.n_layers
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(L)}
    tokens = torch.tensor([ids], device=handle.device)
    with handle.lock, torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
        rows = []
        for layer in range(L):
            ent, norm = attention_entropy(cache[f"blocks.{layer}.attn.hook_pattern"][0])  # [H, Q]
            rows.append(pd.DataFrame({"layer": layer, "head": np.arange(ent.shape[0]),
                                      "entropy": ent.mean(-1).cpu().numpy(),
                                      "norm_entropy": torch.nanmean(norm, -1).cpu().numpy()}))
    keys, h, _, _ = residual_rows(handle, ids, ("resid_post",))
    with handle.lock, torch.no_grad():
        st = lens_stats(bridge.ln_final(h), bridge.W_U, bridge.b_U, k=1)
    return pd.concat(rows, ignore_index=True), st.entropy.view(L, len(ids)).cpu().numpy()


def compute(handle: ModelHandle, spec: EntropySpec, progress) -> Result:
    from .model_view import tokenize

    ids = list(spec.token_ids)
    series = _series(spec)
    heads, tokens_rows, models = [], [], []
    for step, h in series_models(handle, spec, series, progress):
        hd, pred = model_entropy(h, ids)
        hd.insert(0, "step", step)
        hd["collapsed"] = hd["norm_entropy"] < spec.collapse_below
        heads.append(hd)
        final = pred[-1]
        fork_cut = float(np.quantile(final, spec.fork_quantile))
        L, P = pred.shape
        tokens_rows.append(pd.DataFrame({"step": step, "layer": np.repeat(np.arange(L), P),
                                         "pos": np.tile(np.arange(P), L), "entropy": pred.reshape(-1),
                                         "forking": np.tile(final >= fork_cut, L) & (final.std() > 0)}))
        models.append({"step": step, "model": h.name, "revision": h.revision or "", "fingerprint": h.fingerprint})
    heads_t = pd.concat(heads, ignore_index=True)
    tok_t = pd.concat(tokens_rows, ignore_index=True)
    tok_df = tokenize(handle, ids)
    tok_t["token"] = tok_df["token"].to_numpy()[tok_t["pos"].to_numpy()]
    summary = heads_t.groupby("step").agg(mean_norm_entropy=("norm_entropy", "mean"),
                                          collapsed_heads=("collapsed", "sum")).reset_index()
    last_layer = tok_t[tok_t["layer"] == tok_t["layer"].max()]
    summary = summary.merge(last_layer.groupby("step")["entropy"].mean().rename("mean_predictive_entropy")
                            .reset_index(), on="step")
    progress(1.0, "done")
    return Result(table=heads_t, meta={"n_tokens": len(ids), "steps": [m["step"] for m in models]},
                  extra={"tokens": tok_df, "predictive": tok_t, "over_training": summary,
                         "models": pd.DataFrame(models)})
