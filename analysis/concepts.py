"""Concept activations and linear probes (concept activation vectors).

Activations: for each labelled sentence, the residual after every block (and the embedding, "layer -1") at one
position (the last token, or the mean over tokens after BOS), gathered in batches of sentences of one length and
stored as their own run, so probes, the bottleneck and the atlas reuse them.

Probes: one logistic-regression probe (scikit-learn) per concept per layer on a stratified train/test split;
held-out accuracy, the same probe trained on shuffled labels (the control task: what a probe of this capacity
gets from nothing) and selectivity = accuracy - control accuracy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from .errors import WorkbenchError
from .models import DATA_DIR, ModelHandle
from .specs import Spec, _f
from .store import Result

POSITIONS = ("last", "mean")
SHIPPED_CONCEPTS = ("sentiment", "tense", "number", "topic")


@dataclass(frozen=True)
class ConceptActivationsSpec(Spec):
    """Residual activations of the shipped concept sentences, per layer, at one position."""

    analysis: ClassVar[str] = "concept_activations"
    title: ClassVar[str] = "Concept activations: the residual after every layer for each labelled sentence"
    position: str = _f("last", "last: the last token; mean: the mean over tokens after BOS", choices=POSITIONS)
    max_sentences: int = _f(2000, "sentences used", min=20, max=20_000)


def _sentences(max_n: int) -> list[dict]:
    rows = [json.loads(line) for line in (DATA_DIR / "tasks" / "concepts.jsonl").read_text().splitlines()]
    return rows[:max_n]


def concept_activations(handle: ModelHandle, seqs: list[list[int]], position: str) -> np.ndarray:
    """[N, L + 1, d] float32: the embedding (index 0) and the residual after each block."""
    from .model_view import cache_in_batches

    bridge = handle.bridge
    L, d = bridge.cfg.n_layers, bridge.cfg.d_model
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(L)]
    out = np.zeros((len(seqs), L + 1, d), dtype=np.float32)

    def pool(idx, cache):
        acts = torch.stack([cache[n] for n in names], 1).float()  # [b, L + 1, P, d]
        pooled = acts[:, :, -1] if position == "last" else acts[:, :, 1:].mean(2)
        out[idx] = pooled.cpu().numpy()

    cache_in_batches(handle, seqs, names, pool)
    return out


def compute_activations(handle: ModelHandle, spec: ConceptActivationsSpec, progress) -> Result:
    rows = _sentences(spec.max_sentences)
    if any(max(r["ids"]) >= handle.summary.d_vocab for r in rows):
        raise WorkbenchError("The shipped concept sentences are in the default model's tokenizer, which this "
                             "model does not share.")
    progress(0.1, "activations")
    acts = concept_activations(handle, [r["ids"] for r in rows], spec.position)
    N, Lp1, d = acts.shape
    table = pd.DataFrame({"sentence": np.repeat(np.arange(N), Lp1), "layer": np.tile(np.arange(-1, Lp1 - 1), N)})
    table["activation"] = list(acts.reshape(N * Lp1, d))
    labels = pd.DataFrame([{k: r[k] for k in ("id", "text", *SHIPPED_CONCEPTS)} for r in rows])
    return Result(table=table, meta={"n_sentences": N, "n_layers": Lp1 - 1, "d_model": d},
                  extra={"labels": labels})


def activations_array(result: Result) -> np.ndarray:
    """[N, L + 1, d] back from a stored concept-activations result."""
    t = result.table
    N, Lp1 = int(result.meta["n_sentences"]), int(result.meta["n_layers"]) + 1
    return np.stack(t["activation"].to_numpy()).reshape(N, Lp1, -1).astype(np.float32)


@dataclass(frozen=True)
class ProbeSpec(Spec):
    """Linear probes per concept per layer, with a control task."""

    analysis: ClassVar[str] = "probes"
    title: ClassVar[str] = "Concept probes: held-out accuracy per layer, control task and selectivity"
    concepts: tuple[str, ...] = _f(SHIPPED_CONCEPTS, "concepts to probe", choices=SHIPPED_CONCEPTS,
                                   max_len=len(SHIPPED_CONCEPTS))
    position: str = _f("last", "token position of the activations", choices=POSITIONS)
    test_fraction: float = _f(0.2, "held-out fraction", min=0.05, max=0.5)
    C: float = _f(1.0, "inverse L2 regularisation of the logistic regression", min=1e-4, max=1e4)
    seed: int = _f(0, "split and control-label seed", min=0, max=2**31 - 1)

    def validate(self) -> None:
        if not self.concepts:
            raise WorkbenchError("Pick at least one concept.")


def _probe(X_tr, y_tr, X_te, y_te, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_tr)
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit(scaler.transform(X_tr), y_tr)
    return float((clf.predict(scaler.transform(X_te)) == y_te).mean()), clf, scaler


def compute_probes(handle: ModelHandle, spec: ProbeSpec, progress, store=None) -> Result:
    from sklearn.model_selection import train_test_split

    from .runs import run

    acts_run = run(ConceptActivationsSpec(model=spec.model, revision=spec.revision, dtype=spec.dtype,
                                          position=spec.position), store=store, device=handle.device)
    acts = activations_array(acts_run.result)
    labels = acts_run.result.extra["labels"]
    N, Lp1, _ = acts.shape
    rng = np.random.default_rng(spec.seed)
    rows = []
    steps = len(spec.concepts) * Lp1
    for ci, concept in enumerate(spec.concepts):
        y = labels[concept].astype(str).to_numpy()
        classes, counts = np.unique(y, return_counts=True)
        chance = counts.max() / counts.sum()
        tr, te = train_test_split(np.arange(N), test_size=spec.test_fraction, random_state=spec.seed, stratify=y)
        y_control = rng.permutation(y)  # the control task: labels that carry no information
        for li in range(Lp1):
            progress((ci * Lp1 + li) / steps, f"{concept}, layer {li - 1}")
            X = acts[:, li]
            acc, _, _ = _probe(X[tr], y[tr], X[te], y[te], spec.C, spec.seed)
            ctrl, _, _ = _probe(X[tr], y_control[tr], X[te], y_control[te], spec.C, spec.seed)
            rows.append({"concept": concept, "layer": li - 1, "accuracy": acc, "control_accuracy": ctrl,
                         "selectivity": acc - ctrl, "chance": chance, "n_classes": len(classes)})
    table = pd.DataFrame(rows)
    best = table.loc[table.groupby("concept")["accuracy"].idxmax(), ["concept", "layer", "accuracy",
                                                                        "control_accuracy", "selectivity"]]
    return Result(table=table, meta={"n_sentences": N, "activations_run": acts_run.key},
                  extra={"best": best.reset_index(drop=True)})
