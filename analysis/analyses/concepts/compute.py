"""Concept activations and linear probes (concept activation vectors).

Activations: for each labelled text (the shipped sentences or a user's CSV, `concept_data`), the residual after
every block (and the embedding, "layer -1") at one position (the last token, or the mean over tokens after BOS),
gathered in batches of texts of one length and stored as their own run, so probes, the bottleneck, the
interventions and the atlas reuse them. `drop_last` cuts that many final tokens from every text, to read a
behaviour mid-sentence (the bottleneck's default reads the place noun the model picks after "... near the").

Probes: one logistic-regression probe (scikit-learn) per concept per layer on one train/test split shared by all
concepts; held-out accuracy, the same probe trained on shuffled labels (the control task: what a probe of this
capacity gets from nothing) and selectivity = accuracy - control accuracy. Each probe's direction is kept in
activation space (one row per class; a binary concept has one row, pointing to its second class in sorted order):
the concept score of an activation x is the signed distance (w . x + b) / |w| to the probe's boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ... import concept_data
from ...concept_data import pick_concepts
from ...errors import WorkbenchError
from ...estimate import Estimate, Plan, batches, input_estimate, largest
from ...result import Progress, Result, no_progress, sub_progress
from ...session import ModelSession
from ...specs import Spec, param
from ...stats import N_BOOT, bootstrap_interval, resample_weights
from ...tokens import encode_texts

POSITIONS = ("last", "mean")
SHIPPED_CONCEPTS = concept_data.SHIPPED_CONCEPTS


@dataclass(frozen=True)
class ConceptActivationsSpec(Spec):
    """Residual activations of concept-labelled texts, per layer, at one position."""

    analysis: ClassVar[str] = "concept_activations"
    title: ClassVar[str] = "Concept activations: the residual after every layer for each labelled text"
    dataset: str = param("shipped", "'shipped' (the default model's sentences) or the id of an uploaded concept CSV",
                      max_len=64)
    position: str = param("last", "last: the last token; mean: the mean over tokens after BOS", choices=POSITIONS)
    max_sentences: int = param(2000, "texts used (the first ones)", min=20, max=concept_data.MAX_ROWS)
    drop_last: int = param(0, "final tokens cut from every text before it is run", min=0, max=64)


def concept_activations(session: ModelSession, seqs: list[list[int]], position: str,
                        progress: Progress = no_progress) -> np.ndarray:
    """[N, L + 1, d] float32: the embedding (index 0) and the residual after each block. `progress` hears of each
    batch of texts."""
    L, d = session.n_layers, session.cfg.d_model
    names = [session.resid_after(layer) for layer in range(-1, L)]
    out = np.zeros((len(seqs), L + 1, d), dtype=np.float32)
    done = 0

    def pool(idx, cache):
        nonlocal done
        acts = torch.stack([cache[n] for n in names], 1).float()  # [b, L + 1, P, d]
        pooled = acts[:, :, -1] if position == "last" else acts[:, :, 1:].mean(2)
        out[idx] = pooled.cpu().numpy()
        done += len(idx)
        progress(done / len(seqs), f"activations: {done:,} of {len(seqs):,} texts")

    session.cache_in_batches(seqs, names, pool)
    return out


def compute_activations(session: ModelSession, spec: ConceptActivationsSpec, inputs, progress) -> Result:
    labels = inputs["data"].iloc[:spec.max_sentences].reset_index(drop=True)
    progress(0.0, "tokenizing")
    seqs = encode_texts(session, labels["text"], spec.drop_last, spec.bos)
    acts = concept_activations(session, seqs, spec.position, progress=sub_progress(progress, 0.1, 0.95))
    N, Lp1, d = acts.shape
    table = pd.DataFrame({"sentence": np.repeat(np.arange(N), Lp1), "layer": np.tile(np.arange(-1, Lp1 - 1), N)})
    table["activation"] = list(acts.reshape(N * Lp1, d))
    labels = labels.assign(n_tokens=[len(s) for s in seqs])
    return Result(table=table, meta={"n_sentences": N, "n_layers": Lp1 - 1, "d_model": d,
                                     "concepts": concept_data.concept_columns(labels.drop(columns="n_tokens"))},
                  extra={"labels": labels})


def activations_array(result: Result) -> np.ndarray:
    """[N, L + 1, d] back from a stored concept-activations result."""
    t = result.table
    N, Lp1 = int(result.meta["n_sentences"]), int(result.meta["n_layers"]) + 1
    return np.stack(t["activation"].to_numpy()).reshape(N, Lp1, -1).astype(np.float32)


def activations_spec(spec, inputs=None) -> ConceptActivationsSpec:
    """The concept activations a concept analysis builds on (same model, texts, position and cut)."""
    return ConceptActivationsSpec(model=spec.model, revision=spec.revision, dtype=spec.dtype, dataset=spec.dataset,
                                  position=spec.position, max_sentences=spec.max_sentences,
                                  drop_last=getattr(spec, "drop_last", 0))


def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One train/test split of n texts, shared by every concept (so concept scores of held-out texts come from
    probes that never saw them)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


@dataclass
class Probe:
    accuracy: float
    correct: np.ndarray  # [n_test] bool: each held-out text classified right
    classes: np.ndarray  # all classes, sorted
    rows: list[str]  # the class each direction row points to
    weight: np.ndarray  # [k, d] in activation space
    bias: np.ndarray  # [k]

    def scores(self, X: np.ndarray) -> np.ndarray:
        """[N, k] signed distances to the boundary, in activation units."""
        return (X @ self.weight.T + self.bias) / np.linalg.norm(self.weight, axis=1)


def one_blas_thread():
    """numpy's and scipy's OpenBLAS in one thread while scikit-learn fits a small model (a context manager).
    L-BFGS makes thousands of tiny BLAS calls, and a pool of threads costs more than each call's work: a 4-class
    probe (1,600 texts x 256) took 1.3 s with the 2 threads here and 0.09 s with one (2026-12-06). threadpoolctl
    lets one thread at a time set OpenBLAS's process-wide pool and gives it back when that thread's block ends
    (a fit overlapping it in another server thread runs as the pool stands); torch's own pools are not touched."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def fit_probe(X_tr, y_tr, X_te, y_te, C: float, seed: int) -> Probe:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with one_blas_thread():
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
        pipe.fit(X_tr, y_tr)
    correct = pipe.predict(X_te) == y_te
    acc = float(correct.mean())
    scaler, clf = pipe[0], pipe[-1]
    w = clf.coef_ / scaler.scale_  # back to activation space: w . (x - mu) / sigma + b
    b = clf.intercept_ - w @ scaler.mean_
    rows = [str(clf.classes_[1])] if len(clf.classes_) == 2 else [str(c) for c in clf.classes_]
    return Probe(acc, correct, clf.classes_, rows, w.astype(np.float64), b.astype(np.float64))


@dataclass(frozen=True)
class ProbeSpec(Spec):
    """Linear probes per concept per layer, with a control task."""

    analysis: ClassVar[str] = "probes"
    title: ClassVar[str] = "Concept probes: held-out accuracy per layer, control task and selectivity"
    dataset: str = param("shipped", "'shipped' or the id of an uploaded concept CSV", max_len=64)
    concepts: tuple[str, ...] = param((), "concepts to probe (empty: all of the dataset's)", max_len=32)
    position: str = param("last", "token position of the activations", choices=POSITIONS)
    max_sentences: int = param(2000, "texts used (the first ones)", min=20, max=concept_data.MAX_ROWS)
    drop_last: int = param(0, "final tokens cut from every text", min=0, max=64)
    test_fraction: float = param(0.2, "held-out fraction", min=0.05, max=0.5)
    C: float = param(1.0, "inverse L2 regularisation of the logistic regression", min=1e-4, max=1e4)
    seed: int = param(0, "split and control-label seed", min=0, max=2**31 - 1)


def compute_probes(session: ModelSession, spec: ProbeSpec, inputs, progress) -> Result:
    acts_run = inputs["activations"]
    acts = activations_array(acts_run.result)
    labels = acts_run.result.extra["labels"]
    concepts = pick_concepts(spec.concepts, acts_run.result.meta["concepts"])
    N, Lp1, _ = acts.shape
    tr, te = split(N, spec.test_fraction, spec.seed)
    rng = np.random.default_rng(spec.seed)
    weights = resample_weights(len(te), seed=spec.seed)  # one set of resamples of the held-out texts for all
    rows, directions, per_example = [], [], []
    steps = len(concepts) * Lp1
    for ci, concept in enumerate(concepts):
        y = labels[concept].astype(str).to_numpy()
        _, counts = np.unique(y[te], return_counts=True)
        chance = counts.max() / counts.sum()  # of the majority class on the held-out texts
        y_control = rng.permutation(y)  # the control task: labels that carry no information
        for li in range(Lp1):
            where = f"{concept} (concept {ci + 1} of {len(concepts)}), layer {li - 1}"
            progress((ci * Lp1 + li) / steps, f"{where}: the probe")
            X = acts[:, li]
            probe = fit_probe(X[tr], y[tr], X[te], y[te], spec.C, spec.seed)
            progress((ci * Lp1 + li + 0.5) / steps, f"{where}: the control task's probe")
            ctrl = fit_probe(X[tr], y_control[tr], X[te], y_control[te], spec.C, spec.seed)
            (acc_lo,), (acc_hi,) = bootstrap_interval(probe.correct[None].astype(float), weights)
            (sel_lo,), (sel_hi,) = bootstrap_interval((probe.correct.astype(float) - ctrl.correct)[None], weights)
            rows.append({"concept": concept, "layer": li - 1, "accuracy": probe.accuracy, "accuracy_low": acc_lo,
                         "accuracy_high": acc_hi, "control_accuracy": ctrl.accuracy,
                         "selectivity": probe.accuracy - ctrl.accuracy, "selectivity_low": sel_lo,
                         "selectivity_high": sel_hi, "chance": chance, "n_classes": len(probe.classes)})
            per_example.append(pd.DataFrame({"concept": concept, "layer": li - 1, "text": te,
                                             "correct": probe.correct, "control_correct": ctrl.correct}))
            for k, cls in enumerate(probe.rows):
                against = str(probe.classes[0]) if len(probe.classes) == 2 else ""
                directions.append({"concept": concept, "layer": li - 1, "class": cls, "against": against,
                                   "weight": probe.weight[k].astype(np.float32), "bias": float(probe.bias[k])})
    table = pd.DataFrame(rows)
    best = table.loc[table.groupby("concept", sort=False)["accuracy"].idxmax(),
                     ["concept", "layer", "accuracy", "accuracy_low", "accuracy_high", "control_accuracy",
                      "selectivity", "selectivity_low", "selectivity_high"]]
    return Result(table=table, meta={"n_sentences": N, "n_train": len(tr), "n_test": len(te),
                                     "activations_run": acts_run.key,
                                     "statistics": f"accuracy and selectivity on the {len(te)} held-out texts, each "
                                                   f"with a 95% bootstrap interval over those texts ({N_BOOT} "
                                                   "resamples; selectivity's paired with the control task's)"},
                  extra={"best": best.reset_index(drop=True), "directions": pd.DataFrame(directions),
                         "per_example": pd.concat(per_example, ignore_index=True)})


def probes_spec(spec, concepts=()) -> ProbeSpec:
    """The probes a concept analysis builds on, over the same texts and split."""
    return ProbeSpec(model=spec.model, revision=spec.revision, dtype=spec.dtype, dataset=spec.dataset,
                     concepts=tuple(concepts), position=spec.position, max_sentences=spec.max_sentences,
                     drop_last=getattr(spec, "drop_last", 0), test_fraction=getattr(spec, "test_fraction", 0.2),
                     seed=getattr(spec, "seed", 0))


def direction(probes: Result, concept: str, layer: int, cls: str | None = None) -> tuple[np.ndarray, float, str]:
    """A probe's direction (activation space, not normalised), bias and class from a stored probes result."""
    d = probes.extra["directions"]
    d = d[(d["concept"] == concept) & (d["layer"] == layer)]
    if d.empty:
        raise WorkbenchError(f"No probe for {concept!r} at layer {layer}.")
    if cls:
        if len(d) == 1 and cls == d.iloc[0]["against"]:  # a binary concept: toward its other class
            return -np.asarray(d.iloc[0]["weight"], dtype=np.float64), -float(d.iloc[0]["bias"]), cls
        if cls not in set(d["class"]):
            known = sorted(set(d["class"]) | set(d["against"]) - {""})
            raise WorkbenchError(f"{concept!r} has no class {cls!r}.", hint=f"Its classes: {', '.join(known)}.")
        d = d[d["class"] == cls]
    row = d.iloc[0]
    return np.asarray(row["weight"], dtype=np.float64), float(row["bias"]), str(row["class"])


def best_layer(probes: Result, concept: str) -> int:
    t = probes.table[probes.table["concept"] == concept]
    return int(t.loc[t["accuracy"].idxmax(), "layer"])


# ----------------------------------------------------------------------------------------------------------
# Memory and work before a run
# ----------------------------------------------------------------------------------------------------------
ACTIVATION_ROW_SECONDS = 2e-6  # the table of activations: a row per text and layer (reference machine)
FIT_SECONDS = 3.5e-8  # one scikit-learn probe fit in one BLAS thread on the reference machine, per training text
# x width x 3: measured 1.3e-8 to 4.5e-8 (binary and 4-class fits; the default model, SmolLM2, the wide model)


def activations_bytes(s, n: int) -> int:
    """[n, L + 1, d] float32: every layer's residual of n texts."""
    return n * (s.n_layers + 1) * s.d_model * 4


def stored_activations(s, n: int, then: int = 0) -> int:
    """Peak of reading stored activations back (the Parquet blob, its Arrow table, the table of per-row arrays:
    measured at 5-6.5x the array on SmolLM2; then the stacked array and its copy), or of what stays (the table and
    one array) plus `then`, whichever is larger."""
    return max(6 * activations_bytes(s, n), 2 * activations_bytes(s, n) + then)


def forward_batches(plan, lengths: list[int]) -> tuple[int, float, float]:
    """(peak of the largest batch, FLOPs, block invocations) of running texts of these lengths in batches of one
    length, every layer's residual cached and stacked in float32."""
    s = plan.shape
    peak = largest(batches(lengths), lambda r, n: s.forward_bytes(r, n) + s.resid_bytes(r, n, s.n_layers + 1)
                   + s.resid_bytes(r, n, s.n_layers + 1, 4))
    # session.cache_in_batches stops after the last block: no unembedding
    return peak, sum(s.forward_flops(r, n, logits_pos=0) for r, n in batches(lengths)), s.batched_calls(lengths)


def estimate_activations(plan) -> Estimate:
    """The texts run in batches of 64 (every layer's residual cached) into the [texts, L + 1, d] array; then its
    table written to the store (Arrow and Parquet copies of a list column and the writers' buffers, measured at
    about 6x the array and 64 MiB): the larger phase."""
    spec, s = plan.spec, plan.shape
    lengths = plan.lengths(spec.max_sentences, spec.drop_last)
    peak, flops, blocks = forward_batches(plan, lengths)
    acts = activations_bytes(s, len(lengths))
    return Estimate(parts={"forward, or the store's write": max(peak + acts, 6 * acts + 64 * 2**20)}, flops=flops,
                    blocks=blocks, extra_seconds=ACTIVATION_ROW_SECONDS * len(lengths) * (s.n_layers + 1),
                    lower="max_sentences")


def estimate_probes(plan) -> Estimate:
    """The stored activations read back (the table, the stacked array and its float32 copy), one layer's
    training matrix in float64 for scikit-learn; work: two fits (the probe and its control) per concept and
    layer, and the activations when they are not stored yet (`upstream`)."""
    spec, s = plan.spec, plan.shape
    n = min(spec.max_sentences, len(plan.lengths(spec.max_sentences)))
    concepts = list(spec.concepts) or plan.concepts()
    n_train = int(n * (1 - spec.test_fraction))
    fits = 2 * len(concepts) * (s.n_layers + 1)
    upstream = input_estimate(estimate_activations, Plan(s, activations_spec(spec), plan.handle, plan.dataset,
                                                         plan.get_stored))
    return Estimate(parts={"activations and fits": stored_activations(s, n, 3 * n * s.d_model * 8)},
                    flops=0.0, extra_seconds=fits * FIT_SECONDS * n_train * s.d_model * 3,
                    lower="max_sentences or concepts", upstream=[upstream])
