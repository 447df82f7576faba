"""A post-hoc concept bottleneck: can a model behaviour be explained through the probed concepts?

Concept scores (each probe's signed distance to its boundary, `concepts.Probe.scores`) of every text feed a
sparse elastic-net logistic head that predicts a behaviour: the model's own next-token choice among a set of
tokens at the end of each text, or a label column of the dataset (left out of the bottleneck's concepts). Probes
and head are fitted on one train split and scored on the held-out texts. Reported:

- accuracy of the head on the held-out texts, and its weight per concept score (standardised units);
- completeness = (accuracy - chance) / (reference - chance), where the reference is the model itself (1 for its
  own next-token choice: the model always agrees with itself) or, for a label, a linear head on the full residual;
- the same head on the full residual at the same layer(s) (what all of the representation supports);
- the leakage baseline: the same head on as many random directions as there are concept scores (random
  hyperplanes through the activations' mean), over several draws. Random directions can recover much of a
  behaviour; the concepts explain it only as far as they beat them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from ... import concept_data
from ...concept_data import pick_concepts
from ...errors import WorkbenchError
from ...estimate import Estimate, Plan, input_estimate
from ...result import Progress, Result, no_progress, sub_progress
from ...session import ModelSession, check_layer
from ...specs import Spec, param
from ...tokens import encode_texts, single_token_ids
from ..concepts.compute import (
    POSITIONS,
    activations_array,
    best_layer,
    direction,
    estimate_probes,
    forward_batches,
    probes_spec,
    split,
    stored_activations,
)

PLACE_NOUNS = (" coast", " hills", " week", " final", " season", " stadium", " festival", " radio", " stage",
               " dinner", " kitchen", " lunch")


@dataclass(frozen=True)
class BottleneckSpec(Spec):
    """Concept scores -> sparse linear head -> a model behaviour, with completeness and a random baseline."""

    analysis: ClassVar[str] = "bottleneck"
    title: ClassVar[str] = "Concept bottleneck: a sparse head from concept scores to the model's behaviour"
    dataset: str = param("shipped", "'shipped' or the id of an uploaded concept CSV", max_len=64)
    concepts: tuple[str, ...] = param((), "concepts in the bottleneck (empty: all but the target)", max_len=32)
    target: str = param("next_token", "next_token: the model's choice among `tokens` at the end of each text; or a "
                                   "label column of the dataset", max_len=128)
    tokens: tuple[str, ...] = param(PLACE_NOUNS, "the token set the model chooses from (one token each)", max_len=64)
    layer: int = param(-2, "residual the concept scores come from: after block `layer`, -1 the embedding, -2 each "
                        "concept's best probe layer", min=-2, max=1024)
    position: str = param("last", "token position of the activations", choices=POSITIONS)
    max_sentences: int = param(2000, "texts used (the first ones)", min=20, max=concept_data.MAX_ROWS)
    drop_last: int = param(2, "final tokens cut from every text (2 on the shipped sentences: the model then picks "
                           "the place noun after '... near the')", min=0, max=64)
    l1_ratio: float = param(0.5, "elastic-net mix: 0 = L2 only, 1 = L1 only", min=0.0, max=1.0)
    C: float = param(1.0, "inverse regularisation strength of the head", min=1e-4, max=1e4)
    n_random: int = param(10, "random-direction draws for the leakage baseline", min=1, max=100)
    test_fraction: float = param(0.2, "held-out fraction", min=0.05, max=0.5)
    seed: int = param(0, "split and random-direction seed", min=0, max=2**31 - 1)

    def validate(self) -> None:
        if self.target == "next_token" and len(self.tokens) < 2:
            raise WorkbenchError("The model's choice needs at least two tokens to choose from.")

    def resolve(self, model) -> "BottleneckSpec":
        if self.layer != -2:
            check_layer(self.layer, model.summary.n_layers)
        return self


def bottleneck_concepts(spec: BottleneckSpec, data) -> list[str]:
    """The concepts of the bottleneck (all but the target when none are named), after checking the target."""
    available = concept_data.concept_columns(data)
    if spec.target != "next_token" and spec.target not in available:
        raise WorkbenchError(f"target must be 'next_token' or a label column ({', '.join(available)}), not "
                             f"{spec.target!r}.")
    if spec.target in spec.concepts:
        raise WorkbenchError(f"{spec.target!r} is the target; it cannot also be a concept of the bottleneck.")
    return pick_concepts(spec.concepts, [c for c in available if c != spec.target])


def behaviour(session: ModelSession, spec, labels, seqs, tr, te,
              progress: Progress = no_progress) -> tuple[np.ndarray, float]:
    """(the behaviour of every text, chance on the held-out ones): the model's choice among `spec.tokens` after
    each of `seqs`, or the label column `spec.target`; refused when the training texts do not vary. `progress`
    hears of each batch of texts run."""
    if spec.target == "next_token":
        ids = single_token_ids(session, spec.tokens, "token to choose from")
        if len(set(ids)) != len(ids):
            raise WorkbenchError("The token set repeats a token.")
        logits = session.last_logits(seqs, progress=progress)[:, ids]
        y = np.asarray(spec.tokens, dtype=object)[logits.argmax(1).numpy()].astype(str)
    else:
        y = labels[spec.target].astype(str).to_numpy()
    if len(np.unique(y[tr])) < 2:
        raise WorkbenchError(f"The behaviour is the same ({y[0]!r}) for every training text; there is nothing to "
                             "explain.", hint="Choose a token set (or label) on which the texts differ.")
    _, counts = np.unique(y[te], return_counts=True)
    return y, float(counts.max() / counts.sum())


def _head(X_tr, y_tr, X_te, y_te, l1_ratio: float, C: float, seed: int):
    """(held-out accuracy, the fitted logistic head) of a standardised elastic-net logistic regression."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(solver="saga", l1_ratio=l1_ratio, C=C, max_iter=3000,
                                                              random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(X_tr, y_tr)
    return float(pipe.score(X_te, y_te)), pipe[-1]


def _completeness(acc: float, ref: float, chance: float) -> float:
    return float((acc - chance) / (ref - chance)) if ref > chance else float("nan")


def compute(session: ModelSession, spec: BottleneckSpec, inputs, progress) -> Result:
    concepts = bottleneck_concepts(spec, inputs["data"])
    n_layers = session.n_layers
    probes = inputs["probes"].result
    acts_out = inputs["activations"].result
    acts = activations_array(acts_out)
    labels = acts_out.extra["labels"]
    N = len(labels)
    tr, te = split(N, spec.test_fraction, spec.seed)

    progress(0.0, "tokenizing the texts")
    seqs = encode_texts(session, labels["text"], spec.drop_last, spec.bos) if spec.target == "next_token" else None
    y, chance = behaviour(session, spec, labels, seqs, tr, te,
                          progress=sub_progress(progress, 0.05, 0.6, "the behaviour (the model's choice): "))

    # concept scores, one feature per probe direction
    feats, names, layers = [], [], []
    for concept in concepts:
        layer = best_layer(probes, concept) if spec.layer == -2 else spec.layer
        d = probes.extra["directions"]
        for cls in d[(d["concept"] == concept) & (d["layer"] == layer)]["class"]:
            w, b, _ = direction(probes, concept, layer, cls)
            X = acts[:, layer + 1].astype(np.float64)
            feats.append((X @ w + b) / np.linalg.norm(w))
            names.append(f"{concept}: {cls}")
            layers.append(layer)
    S = np.stack(feats, 1)

    progress(0.6, "the bottleneck head")
    acc, clf = _head(S[tr], y[tr], S[te], y[te], spec.l1_ratio, spec.C, spec.seed)
    full_layer = spec.layer if spec.layer != -2 else n_layers - 1
    full = acts[:, full_layer + 1].astype(np.float64)
    progress(0.65, f"the head on the full residual (layer {full_layer})")
    full_acc, _ = _head(full[tr], y[tr], full[te], y[te], 0.0, spec.C, spec.seed)
    reference = 1.0 if spec.target == "next_token" else full_acc

    progress(0.7, "random directions")
    rng = np.random.default_rng(spec.seed)
    random_rows = []
    for r in range(spec.n_random):
        cols = []
        for layer in layers:
            X = acts[:, layer + 1].astype(np.float64)
            u = rng.normal(size=X.shape[1])
            u /= np.linalg.norm(u)
            cols.append((X - X[tr].mean(0)) @ u)  # a random hyperplane through the training texts' mean
        R = np.stack(cols, 1)
        racc, _ = _head(R[tr], y[tr], R[te], y[te], spec.l1_ratio, spec.C, spec.seed)
        random_rows.append({"draw": r, "accuracy": racc, "completeness": _completeness(racc, reference, chance)})
        progress(0.7 + 0.3 * (r + 1) / spec.n_random, f"random directions {r + 1}/{spec.n_random}")
    random_t = pd.DataFrame(random_rows)

    coef = clf.coef_
    head_classes = [str(c) for c in clf.classes_]
    rows_for = [head_classes[1]] if len(head_classes) == 2 else head_classes
    weights = pd.DataFrame([{"feature": names[j], "layer": layers[j], "behaviour": rows_for[k],
                             "weight": float(coef[k, j])} for k in range(coef.shape[0]) for j in range(len(names))])
    summary = pd.DataFrame([
        {"head": "concept bottleneck", "features": len(names), "accuracy": acc,
         "completeness": _completeness(acc, reference, chance)},
        {"head": f"random directions (mean of {spec.n_random})", "features": len(names),
         "accuracy": float(random_t["accuracy"].mean()), "completeness": float(random_t["completeness"].mean())},
        {"head": f"full residual, layer {full_layer}", "features": int(full.shape[1]), "accuracy": full_acc,
         "completeness": _completeness(full_acc, reference, chance)},
        {"head": "majority class (chance)", "features": 0, "accuracy": chance, "completeness": 0.0},
    ])
    counts = pd.Series(y).value_counts()
    return Result(table=weights, meta={
        "accuracy": acc, "completeness": _completeness(acc, reference, chance), "chance": chance,
        "reference": reference, "full_accuracy": full_acc,
        "random_accuracy_mean": float(random_t["accuracy"].mean()),
        "random_accuracy_std": float(random_t["accuracy"].std(ddof=0)),
        "nonzero_weights": int((np.abs(coef) > 1e-8).sum()), "n_weights": int(coef.size),
        "n_train": len(tr), "n_test": len(te), "features": names, "target": spec.target,
        "behaviour_counts": {str(k): int(v) for k, v in counts.items()}},
        extra={"summary": summary, "random": random_t})


SAGA_SECONDS = 2e-5  # an elastic-net head (scikit-learn's saga) on the reference machine, per training text x feature


def estimate(plan) -> Estimate:
    """The stored activations read back, the texts run again for the model's choice (the last position's logits
    of every text, float32), float64 copies of one layer for the heads; work: that forward, the full-residual
    head and the random-direction heads, and the probes (with their activations) when not stored yet."""
    spec, s = plan.spec, plan.shape
    lengths = plan.lengths(spec.max_sentences, spec.drop_last)
    n = len(lengths)
    peak, flops, blocks = forward_batches(plan, lengths) if spec.target == "next_token" else (0, 0.0, 0.0)
    n_train = int(n * (1 - spec.test_fraction))
    upstream = input_estimate(estimate_probes, Plan(s, probes_spec(spec, spec.concepts), plan.handle, plan.dataset,
                                                    plan.get_stored))
    then = peak + n * s.d_vocab * 4 + 4 * n * s.d_model * 8  # the forward, every text's logits, the heads
    return Estimate(parts={"activations, forward and heads": stored_activations(s, n, then)},
                    flops=flops, blocks=blocks,
                    extra_seconds=SAGA_SECONDS * n_train * (s.d_model + 4 * spec.n_random),
                    lower="max_sentences", upstream=[upstream])
