"""Feature pages: for every feature of an SAE, its top-activating contexts (each token with the feature's
activation), a histogram of its non-zero activations, its density, and the tokens it promotes and suppresses
through the unembedding; and an index from tokens to the features that fire on them (search by token).

Measured on the SAE's whole corpus (its training and held-out sentences, or the user's text): these pages
describe what a feature does on text, not a held-out score. The logit effects are W_dec[f] @ W_U, the direct
path from the feature's decoder direction to the logits without the final norm (as Neuronpedia shows them): a
ranking of tokens, not a prediction of the model's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ...estimate import ENTRY_FLOPS, Estimate
from ...result import Result, sub_progress
from ...session import ModelSession
from ...specs import param
from .sae import (
    SKIP_FIRST,
    SAESpec,
    corpus_split,
    corpus_tokens,
    encode_rows,
    sae_from_result,
    sae_upstream,
    site_activations,
)

CHUNK = 4096  # tokens encoded at once


@dataclass(frozen=True)
class FeaturesSpec(SAESpec):
    """Feature pages for an SAE: top contexts, histograms, logit effects, density, a token index."""

    analysis: ClassVar[str] = "sae_features"
    title: ClassVar[str] = "SAE features: top-activating contexts, activation histograms, logit effects"
    top_n: int = param(12, "top-activating contexts kept per feature", min=1, max=100)
    context: int = param(10, "tokens shown before each top activation (and 3 after)", min=1, max=64)
    bins: int = param(24, "histogram bins", min=4, max=200)
    logit_n: int = param(10, "promoted and suppressed tokens kept per feature", min=1, max=100)


def token_strings(session: ModelSession, ids) -> list[str]:
    return session.tokenizer.batch_decode([[int(i)] for i in ids])


def logit_effects(session: ModelSession, W_dec: torch.Tensor, n: int) -> pd.DataFrame:
    """The n tokens each feature's decoder direction promotes and suppresses most through W_U (no final norm)."""
    bridge = session.bridge
    with torch.no_grad():
        zero = bridge.unembed(torch.zeros(1, 1, W_dec.shape[1], device=session.device,
                                          dtype=bridge.cfg.dtype)).float()[0, 0]  # b_U, in the model's dtype
        rows = []
        for c in range(0, W_dec.shape[0], 256):
            eff = bridge.unembed(W_dec[c:c + 256, None].to(session.device, bridge.cfg.dtype)).float()[:, 0] - zero
            top, bottom = eff.topk(n, dim=-1), (-eff).topk(n, dim=-1)
            for j in range(eff.shape[0]):
                for direction, vals, idx in (("promotes", top.values[j], top.indices[j]),
                                             ("suppresses", -bottom.values[j], bottom.indices[j])):
                    for r in range(n):
                        rows.append((c + j, direction, r, int(idx[r]), float(vals[r])))
    t = pd.DataFrame(rows, columns=["feature", "direction", "rank", "token_id", "effect"])
    uniq = t["token_id"].unique()
    names = dict(zip(uniq, token_strings(session, uniq)))
    return t.assign(token=t["token_id"].map(names))


def compute(session: ModelSession, spec: FeaturesSpec, inputs, progress) -> Result:
    sae, _ = sae_from_result(inputs["sae"].result)
    sae = sae.to(session.device)
    hook, skip_first = spec.hook_name, SKIP_FIRST
    train, held, _ = corpus_split(session, spec)
    seqs = train + held
    X, which, where = site_activations(session, seqs, hook, skip_first, spec.max_tokens,
                                       progress=sub_progress(progress, 0.0, 0.8, f"activations at {hook}: "))
    ids = np.asarray([seqs[s][p] for s, p in zip(which, where)])
    N, W = X.shape[0], sae.d_sae
    top_vals = torch.full((spec.top_n, W), -1.0)
    top_rows = torch.zeros((spec.top_n, W), dtype=torch.long)
    peak = torch.zeros(W)
    count = torch.zeros(W)
    pairs = []  # (row, feature, activation) of every non-zero activation, for the histograms and the token index
    progress(0.8, "encoding")
    with torch.no_grad():
        for c in range(0, N, CHUNK):
            a = sae.encode(X[c:c + CHUNK].to(session.device)).float().cpu()  # [n, W]
            count += (a > 0).sum(0)
            peak = torch.maximum(peak, a.max(0).values)
            k = min(spec.top_n, a.shape[0])
            v, r = a.topk(k, dim=0)
            vals = torch.cat([top_vals, v])
            rows = torch.cat([top_rows, r + c])
            best = vals.topk(spec.top_n, dim=0)
            top_vals, top_rows = best.values, rows.gather(0, best.indices)
            nz = a.nonzero()
            pairs.append((np.stack([nz[:, 0].numpy() + c, nz[:, 1].numpy()], 1), a[nz[:, 0], nz[:, 1]].numpy()))
            progress(0.8 + 0.1 * min(1.0, (c + CHUNK) / N), f"encoding: {min(N, c + CHUNK):,} of {N:,} tokens")
    rows_nz = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros((0, 2), dtype=np.int64)
    vals_nz = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, dtype=np.float32)

    # top contexts, each token with this feature's activation
    progress(0.9, "top contexts")
    start_row = {}
    for i, (s, p) in enumerate(zip(which, where)):
        start_row.setdefault(int(s), i - int(p) + int(skip_first))  # the row of position `skip_first`
    lengths = {int(s): len(seqs[int(s)]) for s in np.unique(which)}
    examples, windows = [], []
    for f in range(W):
        for r in range(spec.top_n):
            act = float(top_vals[r, f])
            if act <= 0:
                break
            row = int(top_rows[r, f])
            s, p = int(which[row]), int(where[row])
            lo, hi = max(int(skip_first), p - spec.context), min(lengths[s], p + 4)
            rows = [start_row[s] + q - int(skip_first) for q in range(lo, hi)]
            rows = [w for w in rows if w < N and which[w] == s]
            windows.append(rows)
            examples.append({"feature": f, "rank": r, "activation": act, "sequence": s, "position": p,
                             "token_ids": [int(seqs[s][int(where[w])]) for w in rows], "max_index": rows.index(row)})
    # every context's tokens encoded in a few chunks; each keeps its own feature's column
    flat = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)
    feats = np.repeat([e["feature"] for e in examples], [len(w) for w in windows]).astype(np.int64)
    window_acts = np.zeros(len(flat), dtype=np.float32)
    step = encode_rows(W)
    with torch.no_grad():
        for c in range(0, len(flat), step):
            a = sae.encode(X[flat[c:c + step]].to(session.device)).float().cpu()
            window_acts[c:c + step] = a[torch.arange(a.shape[0]), torch.as_tensor(feats[c:c + step])].numpy()
    for e, part in zip(examples, np.split(window_acts, np.cumsum([len(w) for w in windows])[:-1])):
        e["activations"] = part
    ex = pd.DataFrame(examples, columns=["feature", "rank", "activation", "sequence", "position", "token_ids",
                                         "activations", "max_index"])
    all_ids = sorted({i for t in ex["token_ids"] for i in t})
    names = dict(zip(all_ids, token_strings(session, all_ids)))
    ex["tokens"] = [[names[i] for i in t] for t in ex["token_ids"]]

    # histograms of non-zero activations, bins from 0 to each feature's maximum
    progress(0.93, "histograms")
    f_idx = rows_nz[:, 1]
    top = peak.numpy()[f_idx]
    b = np.minimum((vals_nz / np.maximum(top, 1e-12) * spec.bins).astype(np.int64), spec.bins - 1)
    hist = np.zeros((W, spec.bins), dtype=np.int64)
    np.add.at(hist, (f_idx, b), 1)
    edges = peak.numpy()[:, None] * np.arange(spec.bins + 1)[None] / spec.bins
    histograms = pd.DataFrame({"feature": np.repeat(np.arange(W), spec.bins), "bin": np.tile(np.arange(spec.bins), W),
                               "low": edges[:, :-1].reshape(-1), "high": edges[:, 1:].reshape(-1),
                               "count": hist.reshape(-1)})
    histograms = histograms[histograms["count"] > 0].reset_index(drop=True)

    # token index: features by mean activation over a token's occurrences
    progress(0.95, "token index")
    occurrences = pd.Series(ids).value_counts()
    by = pd.DataFrame({"token_id": ids[rows_nz[:, 0]], "feature": f_idx, "activation": vals_nz})
    by = by.groupby(["token_id", "feature"], as_index=False).agg(total=("activation", "sum"),
                                                               fired=("activation", "size"))
    by["occurrences"] = by["token_id"].map(occurrences).to_numpy()
    by["mean_activation"] = by["total"] / by["occurrences"]  # over every occurrence of the token, zeros included
    by = by.sort_values(["token_id", "mean_activation"], ascending=[True, False]).groupby("token_id").head(10)
    tok_names = dict(zip(by["token_id"].unique(), token_strings(session, by["token_id"].unique())))
    by = by.assign(token=by["token_id"].map(tok_names))[["token_id", "token", "feature", "mean_activation", "fired",
                                                          "occurrences"]].reset_index(drop=True)

    progress(0.97, "logit effects")
    logits = logit_effects(session, sae.W_dec.detach(), spec.logit_n)
    summary = pd.DataFrame({"feature": np.arange(W), "density": (count / N).numpy(), "max_activation": peak.numpy()})
    top_tok = ex[ex["rank"] < 5].groupby("feature")["tokens"].apply(
        lambda s_: " ".join(repr(t[i]) for t, i in zip(s_, ex.loc[s_.index, "max_index"])))
    summary["top_tokens"] = summary["feature"].map(top_tok).fillna("")
    for direction in ("promotes", "suppresses"):
        words = logits[(logits["direction"] == direction) & (logits["rank"] < 5)].groupby("feature")["token"].apply(
            lambda s_: " ".join(map(repr, s_)))
        summary[direction] = summary["feature"].map(words).fillna("")
    return Result(table=summary, meta={"n_tokens": int(N), "n_sequences": len(seqs), "hook_name": hook,
                                       "d_sae": W, "sae_run": inputs["sae"].key,
                                       "measured_on": f"the SAE's corpus: {len(seqs)} sentences, {N:,} tokens "
                                                      f"(training and held-out text together)"},
                  extra={"examples": ex, "histograms": histograms, "logits": logits, "by_token": by})


def estimate(plan) -> Estimate:
    """The corpus's activations (pieces and concatenation), an encoding chunk ([CHUNK, width] float32: the
    pre-activations, top-k, activations and the running top rows), and every non-zero activation kept as (row,
    feature, value) and grouped by token (numpy arrays, their concatenation and the grouping's frames)."""
    spec, s = plan.spec, plan.shape
    T = corpus_tokens(spec)
    nonzero = T * (spec.k if spec.architecture == "topk" else 64)
    return Estimate(parts={"activations": 2 * T * s.d_model * 4, "encoding chunk": 6 * CHUNK * spec.width * 4,
                           "non-zero activations": nonzero * 20 * 4},
                    flops=s.forward_flops(T / 14, 14) + 2.0 * T * s.d_model * spec.width * 2
                    + 2.0 * spec.width * s.d_model * s.d_vocab + ENTRY_FLOPS * 6 * T * spec.width,
                    blocks=s.calls(T / (14 * 64) + 20),
                    extra_seconds=spec.width * spec.top_n * 2e-5 + nonzero * 2e-7,  # contexts; the token index
                    lower="max_tokens or width",
                    upstream=sae_upstream(plan))
