"""The activation atlas: a 2-d map (UMAP, or PCA as the fast option) of activations at one layer.

Points are texts (their last-token or mean activation, from the stored concept activations) or tokens (every
token after BOS of every text, sampled down to `max_points`). Each point keeps its text, token and concept labels,
so the map can be coloured by any concept and hovering shows what the point is. The embedding is a stored run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from kernels.atlas import pca_2d, umap_2d

from ... import concept_data
from ...errors import WorkbenchError
from ...estimate import Estimate, Plan, batches, input_estimate, largest
from ...result import Progress, Result, no_progress, sub_progress
from ...session import ModelSession, check_layer
from ...specs import Spec, param
from ...tokens import encode_texts
from ..concepts.compute import POSITIONS, activations_array, activations_spec, estimate_activations, stored_activations


@dataclass(frozen=True)
class AtlasSpec(Spec):
    """A UMAP or PCA map of the activations at one layer, with each point's text, token and labels."""

    analysis: ClassVar[str] = "atlas"
    title: ClassVar[str] = "Activation atlas: a 2-d map of one layer's activations, coloured by concept"
    dataset: str = param("shipped", "'shipped' or the id of an uploaded concept CSV", max_len=64)
    layer: int = param(-2, "residual after block `layer`; -1 the embedding; -2 the last block", min=-2, max=1024)
    unit: str = param("token", "token: every token of every text; text: one point per text", choices=("token", "text"))
    position: str = param("last", "for text points: the last token, or the mean over tokens", choices=POSITIONS)
    method: str = param("umap", "umap, or pca (fast, linear)", choices=("umap", "pca"))
    max_points: int = param(5000, "points kept (sampled when there are more)", min=50, max=50_000)
    max_sentences: int = param(2000, "texts used (the first ones)", min=20, max=concept_data.MAX_ROWS)
    n_neighbors: int = param(15, "UMAP neighbours", min=2, max=200)
    min_dist: float = param(0.1, "UMAP minimum distance", min=0.0, max=1.0)
    seed: int = param(0, "sampling and UMAP seed", min=0, max=2**31 - 1)

    def resolve(self, model) -> "AtlasSpec":
        if self.layer != -2:
            check_layer(self.layer, model.summary.n_layers)
        return self


def token_activations(session: ModelSession, seqs: list[list[int]], layer: int, progress: Progress = no_progress):
    """Every token after BOS: ([n, d] float32, text index, position). `progress` hears of each batch of texts."""
    name = session.resid_after(layer)
    parts: dict[int, np.ndarray] = {}

    def visit(idx, cache):
        acts = cache[name][:, 1:].float().cpu().numpy()
        for j, i in enumerate(idx):
            parts[i] = acts[j]
        progress(len(parts) / len(seqs), f"{len(parts):,} of {len(seqs):,} texts")

    session.cache_in_batches(seqs, [name], visit)
    X = np.concatenate([parts[i] for i in range(len(seqs))])
    text = np.concatenate([np.full(len(s) - 1, i) for i, s in enumerate(seqs)])
    pos = np.concatenate([np.arange(1, len(s)) for s in seqs])
    return X, text, pos


def compute(session: ModelSession, spec: AtlasSpec, inputs, progress) -> Result:
    n_layers = session.n_layers
    layer = n_layers - 1 if spec.layer == -2 else spec.layer
    rng = np.random.default_rng(spec.seed)
    progress(0.0, "activations")
    if spec.unit == "text":
        acts = inputs["activations"].result
        labels = acts.extra["labels"]
        X = activations_array(acts)[:, layer + 1]
        text_idx, pos = np.arange(len(X)), (labels["n_tokens"].to_numpy() - 1 if spec.position == "last"
                                            else np.full(len(X), -1))
    else:
        labels = inputs["data"].iloc[:spec.max_sentences].reset_index(drop=True)
        seqs = encode_texts(session, labels["text"], bos=spec.bos)
        X, text_idx, pos = token_activations(session, seqs, layer, progress=sub_progress(
            progress, 0.05, 0.4, f"activations at layer {layer}: "))
    if len(X) > spec.max_points:
        keep = np.sort(rng.choice(len(X), spec.max_points, replace=False))
        X, text_idx, pos = X[keep], text_idx[keep], pos[keep]
    if len(X) < 3:
        raise WorkbenchError("The atlas needs at least three points.")
    progress(0.4, f"{spec.method} of {len(X):,} points")
    t0 = time.perf_counter()
    if spec.method == "umap":
        xy, info = umap_2d(X, spec.n_neighbors, spec.min_dist, spec.seed, progress=sub_progress(progress, 0.4, 1.0))
    else:
        xy, info = pca_2d(X)
    seconds = time.perf_counter() - t0
    table = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "text_index": text_idx, "position": pos})
    table["text"] = labels["text"].to_numpy()[text_idx]
    if spec.unit == "token":
        tok = session.tokenizer
        table["token"] = [tok.decode([seqs[t][p]]) for t, p in zip(text_idx, pos)]
    else:
        table["token"] = "(last token)" if spec.position == "last" else "(mean over tokens)"
    for c in concept_data.concept_columns(labels.drop(columns=["n_tokens"], errors="ignore")):
        table[c] = labels[c].astype(str).to_numpy()[text_idx]
    return Result(table=table, meta={"layer": layer, "n_points": len(table), "embed_seconds": seconds,
                                     "method": spec.method, **info})





UMAP_SECONDS = 1.1e-4  # per point and neighbour on the reference machine, after numba's first compilation (the default
# model's atlas of 5,000 points, 15 neighbours: 8.8 s in all, benchmarks/estimates.py)


def estimate(plan) -> Estimate:
    """unit=token: the texts run in batches with one layer cached, every token's activation kept (float32) before
    sampling; unit=text: the stored activations read back (and computed first when not stored); then the 2-d
    embedding of the points kept and the table."""
    spec, s = plan.spec, plan.shape
    lengths = plan.lengths(spec.max_sentences)
    upstream = []
    if spec.unit == "token":
        n_points = sum(n - 1 for n in lengths)
        peak = largest(batches(lengths), lambda r, n: s.forward_bytes(r, n) + s.resid_bytes(r, n, 1, 4))
        kept = 2 * n_points * s.d_model * 4
        flops = sum(s.forward_flops(r, n, logits_pos=0) for r, n in batches(lengths))  # no unembedding
        blocks = s.batched_calls(lengths)
    else:
        n_points, peak, flops, blocks = len(lengths), 0, 0.0, 0.0
        kept = stored_activations(s, len(lengths))
        upstream.append(input_estimate(estimate_activations, Plan(s, activations_spec(spec), plan.handle, plan.dataset,
                                                  plan.get_stored)))
    m = min(spec.max_points, n_points)
    embed = m * s.d_model * 8 * 3 + m * spec.n_neighbors * 64
    seconds = UMAP_SECONDS * m * spec.n_neighbors if spec.method == "umap" else 1e-8 * m * s.d_model ** 2
    # one at a time: the last batch's forward beside the activations gathered so far, their concatenation,
    # then the embedding of the points kept (the rest let go)
    at_once = max(peak + kept // 2, kept, m * s.d_model * 4 + embed)
    return Estimate(parts={"forward, activations and embedding": at_once, "table": m * 400},
                    flops=flops, blocks=blocks, extra_seconds=seconds, lower="max_sentences or max_points",
                    upstream=upstream)
