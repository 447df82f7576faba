"""Discover-then-name: SAE features named after the fact by the concept labels they predict, and a concept
bottleneck built on the named features, side by side with the probe bottleneck of the Concepts page.

Each labelled text (the shipped concept sentences or a user's CSV, `drop_last` final tokens cut as for the
bottleneck) gets one value per feature: its activation at the last token (where the probe bottleneck reads its
residual and the model makes the choice it explains), or its largest or mean activation over the tokens. On the train
split, every feature is scored against every (concept, class) by AUROC (class vs the rest); a feature is named
after the label it separates best when that AUROC reaches `min_auroc`, and also by the tokens it peaks on. The
names' AUROC is then measured again on the held-out texts (the names were chosen without them).

The bottleneck: for each (concept, class) the `per_class` features named best for it; their values feed the same
sparse logistic head as the probe bottleneck (`bottleneck.compute._head`), fitted on the same train split and
scored on the same held-out texts, for the same behaviour (the model's next-token choice among a token set, or
a label). Leakage baseline: the same head on as many features drawn at random from the live ones.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from ... import concept_data
from ...errors import WorkbenchError
from ...estimate import Estimate, Plan, input_estimate
from ...result import Progress, Result, no_progress, sub_progress
from ...session import ModelSession
from ...specs import param
from ...tokens import encode_texts
from ..bottleneck.compute import (
    PLACE_NOUNS,
    SAGA_SECONDS,
    BottleneckSpec,
    _completeness,
    _head,
    behaviour,
    bottleneck_concepts,
)
from ..bottleneck.compute import estimate as estimate_bottleneck
from ..concepts.compute import split
from .browse import token_strings
from .sae import SKIP_FIRST, SAESpec, sae_from_result, sae_upstream, site_activations


@dataclass(frozen=True)
class FeatureNamesSpec(SAESpec):
    """Name SAE features by concept labels and top tokens; a concept bottleneck on the named features."""

    analysis: ClassVar[str] = "sae_names"
    title: ClassVar[str] = "Discover-then-name: SAE features named by concepts, and their concept bottleneck"
    dataset: str = param("shipped", "'shipped' or the id of an uploaded concept CSV", max_len=64)
    concepts: tuple[str, ...] = param((), "concepts to name features by (empty: all but the target)", max_len=32)
    max_sentences: int = param(2000, "texts used (the first ones)", min=20, max=concept_data.MAX_ROWS)
    drop_last: int = param(2, "final tokens cut from every text (2 on the shipped sentences: the model then picks "
                              "the place noun after '... near the')", min=0, max=64)
    pool: str = param("last", "a text's value of a feature: its activation at the last token (where the probe "
                              "bottleneck reads), or its max or mean over the tokens", choices=("last", "max", "mean"))
    min_auroc: float = param(0.8, "a feature is named after a label when its training AUROC reaches this",
                             min=0.5, max=1.0)
    per_class: int = param(1, "named features per concept class in the bottleneck", min=1, max=16)
    target: str = param("next_token", "next_token: the model's choice among `tokens` at the end of each text; or a "
                                      "label column of the dataset", max_len=128)
    tokens: tuple[str, ...] = param(PLACE_NOUNS, "the token set the model chooses from (one token each)", max_len=64)
    l1_ratio: float = param(0.5, "elastic-net mix of the head", min=0.0, max=1.0)
    C: float = param(1.0, "inverse regularisation strength of the head", min=1e-4, max=1e4)
    n_random: int = param(10, "random feature draws for the leakage baseline", min=1, max=100)
    test_fraction: float = param(0.2, "held-out fraction", min=0.05, max=0.5)
    split_seed: int = param(0, "seed of the train/held-out split and the random draws", min=0, max=2**31 - 1)

    def validate(self) -> None:
        SAESpec.validate(self)
        if self.target == "next_token" and len(self.tokens) < 2:
            raise WorkbenchError("The model's choice needs at least two tokens to choose from.")

    @property
    def probe_layer(self) -> int:
        """The residual layer the probe bottleneck compares at: the SAE's block (its output)."""
        return self.layer - 1 if self.site == "resid_pre" else self.layer


def probe_bottleneck_spec(spec: FeatureNamesSpec, inputs=None) -> BottleneckSpec:
    """The probe bottleneck over the same texts, split, behaviour and head, at the SAE's layer."""
    return BottleneckSpec(model=spec.model, revision=spec.revision, dtype=spec.dtype, bos=spec.bos,
                          dataset=spec.dataset, concepts=spec.concepts, target=spec.target, tokens=spec.tokens,
                          layer=spec.probe_layer, position="last", max_sentences=spec.max_sentences,
                          drop_last=spec.drop_last, l1_ratio=spec.l1_ratio, C=spec.C, n_random=spec.n_random,
                          test_fraction=spec.test_fraction, seed=spec.split_seed)


def auroc(values: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of every column of values [N, W] for the boolean labels [N] (ties count half)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(values.shape[1], np.nan)
    ranks = rankdata(values, axis=0)
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pooled_features(session: ModelSession, sae, hook: str, seqs: list[list[int]], skip_first: bool,
                    pool: str, progress: Progress = no_progress) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """(per-text feature values [N, W], the activations [T, d], each row's text [T]). `progress` hears of each
    batch of texts run."""
    X, which, _ = site_activations(session, seqs, hook, skip_first, progress=progress)
    W = sae.d_sae
    out = torch.zeros(len(seqs), W)
    counts = torch.zeros(len(seqs))
    idx = torch.as_tensor(which)
    if pool == "last":  # each text's last row (rows of one text are consecutive)
        last = np.flatnonzero(np.r_[which[1:] != which[:-1], True])
        with torch.no_grad():
            for c in range(0, len(last), 4096):
                rows = last[c:c + 4096]
                out[torch.as_tensor(which[rows])] = sae.encode(X[rows].to(session.device)).float().cpu()
        return out.numpy().astype(np.float64), X, which
    with torch.no_grad():
        for c in range(0, X.shape[0], 4096):
            a = sae.encode(X[c:c + 4096].to(session.device)).float().cpu()
            i = idx[c:c + 4096]
            if pool == "max":
                with warnings.catch_warnings():  # index_reduce is marked beta
                    warnings.simplefilter("ignore", UserWarning)
                    out.index_reduce_(0, i, a, "amax")
            else:
                out.index_add_(0, i, a)
                counts.index_add_(0, i, torch.ones(len(i)))
    if pool == "mean":
        out /= counts.clamp(min=1)[:, None]
    return out.numpy().astype(np.float64), X, which


def compute(session: ModelSession, spec: FeatureNamesSpec, inputs, progress) -> Result:
    data = inputs["data"]
    concepts = bottleneck_concepts(spec, data)  # the target checked, as the probe bottleneck does
    sae, _ = sae_from_result(inputs["sae"].result)
    sae = sae.to(session.device)
    labels = data.iloc[:spec.max_sentences].reset_index(drop=True)
    skip_first = SKIP_FIRST
    progress(0.0, "tokenizing the labelled texts")
    seqs = encode_texts(session, labels["text"], spec.drop_last, spec.bos)
    F, X, which = pooled_features(session, sae, spec.hook_name, seqs, skip_first, spec.pool, progress=sub_progress(
        progress, 0.02, 0.25, "feature activations of the labelled texts: "))
    N, W = F.shape
    tr, te = split(N, spec.test_fraction, spec.split_seed)
    live = np.flatnonzero(F[tr].max(0) > 0)

    progress(0.25, "naming features")
    scores = []  # (concept, class, train AUROC [W])
    for concept in concepts:
        y = labels[concept].astype(str).to_numpy()
        for cls in sorted(np.unique(y)):
            scores.append((concept, cls, auroc(F[tr], y[tr] == cls)))
    A = np.stack([s[2] for s in scores])  # [labels, W]
    A = np.where(np.isnan(A), 0.5, A)
    A[:, np.setdiff1d(np.arange(W), live)] = 0.5  # a feature that never fires on the training texts names nothing
    best = A.argmax(0)
    rows = []
    for f in np.flatnonzero(A.max(0) >= spec.min_auroc):
        concept, cls, _ = scores[best[f]]
        y = labels[concept].astype(str).to_numpy()
        held = auroc(F[te][:, [f]], y[te] == cls)[0]
        rows.append({"feature": int(f), "name": f"{concept}: {cls}", "concept": concept, "class": cls,
                     "train_auroc": float(A[best[f], f]), "heldout_auroc": float(held),
                     "mean_on_class": float(F[tr][y[tr] == cls, f].mean()),
                     "mean_off_class": float(F[tr][y[tr] != cls, f].mean())})
    names = pd.DataFrame(rows, columns=["feature", "name", "concept", "class", "train_auroc", "heldout_auroc",
                                        "mean_on_class", "mean_off_class"])
    # ... and by the tokens each named feature peaks on, in its ten strongest texts
    top_tokens = []
    with torch.no_grad():
        for f in names["feature"]:
            peaks = []
            for s in np.argsort(-F[:, f])[:10]:
                rows_s = np.flatnonzero(which == s)
                a = sae.encode(X[rows_s].to(session.device))[:, f]
                peaks.append(seqs[s][int(skip_first) + int(a.argmax())])
            common = pd.Series(token_strings(session, peaks)).value_counts().index[:3]
            top_tokens.append(" ".join(repr(t) for t in common))
    names["top_tokens"] = top_tokens
    names = names.sort_values(["concept", "class", "train_auroc"], ascending=[True, True, False]).reset_index(
        drop=True)

    # the behaviour, as the probe bottleneck reads it
    y, chance = behaviour(session, spec, labels, seqs, tr, te,
                          progress=sub_progress(progress, 0.3, 0.75, "the behaviour (the model's choice): "))
    probe = inputs["bottleneck"].result
    reference = float(probe.meta["reference"])

    progress(0.75, "the feature bottleneck")
    chosen, chosen_names = [], []
    for (concept, cls, _), a in zip(scores, A):
        for f in np.argsort(-a)[:spec.per_class]:
            if f not in chosen:
                chosen.append(int(f))
                chosen_names.append(f"{concept}: {cls} (feature {f}, AUROC {a[f]:.2f})")
    S = F[:, chosen]
    acc, clf = _head(S[tr], y[tr], S[te], y[te], spec.l1_ratio, spec.C, spec.split_seed)
    rng = np.random.default_rng(spec.split_seed)
    pool_ = np.setdiff1d(live, chosen)
    random_acc = []
    for r in range(spec.n_random):
        pick = rng.choice(pool_, size=min(len(chosen), len(pool_)), replace=False)
        racc, _ = _head(F[tr][:, pick], y[tr], F[te][:, pick], y[te], spec.l1_ratio, spec.C, spec.split_seed)
        random_acc.append(racc)
        progress(0.75 + 0.2 * (r + 1) / spec.n_random, f"random features {r + 1}/{spec.n_random}")
    all_acc, _ = _head(F[tr][:, live], y[tr], F[te][:, live], y[te], 0.0, spec.C, spec.split_seed)
    pm = probe.meta
    summary = pd.DataFrame([
        {"bottleneck": "named SAE features (discover-then-name)", "features": len(chosen), "accuracy": acc,
         "completeness": _completeness(acc, reference, chance), "random_accuracy": float(np.mean(random_acc)),
         "random_completeness": _completeness(float(np.mean(random_acc)), reference, chance)},
        {"bottleneck": "probe directions (Concepts page)", "features": len(pm["features"]), "accuracy": pm["accuracy"],
         "completeness": pm["completeness"], "random_accuracy": pm["random_accuracy_mean"],
         "random_completeness": _completeness(pm["random_accuracy_mean"], reference, chance)},
        {"bottleneck": f"all {len(live)} live SAE features", "features": len(live), "accuracy": all_acc,
         "completeness": _completeness(all_acc, reference, chance), "random_accuracy": float("nan"),
         "random_completeness": float("nan")},
        {"bottleneck": f"full residual, layer {spec.probe_layer}", "features": int(session.cfg.d_model),
         "accuracy": pm["full_accuracy"], "completeness": _completeness(pm["full_accuracy"], reference, chance),
         "random_accuracy": float("nan"), "random_completeness": float("nan")},
    ])
    coef = clf.coef_
    head_classes = [str(c) for c in clf.classes_]
    rows_for = [head_classes[1]] if len(head_classes) == 2 else head_classes
    weights = pd.DataFrame([{"feature": chosen_names[j], "behaviour": rows_for[k], "weight": float(coef[k, j])}
                            for k in range(coef.shape[0]) for j in range(len(chosen))])
    matched = names.groupby("concept")["heldout_auroc"].max().to_dict() if len(names) else {}
    return Result(table=names, meta={
        "n_named": len(names), "n_live": int(len(live)), "d_sae": W, "accuracy": acc, "chance": chance,
        "reference": reference, "completeness": _completeness(acc, reference, chance),
        "random_accuracy_mean": float(np.mean(random_acc)), "probe_accuracy": pm["accuracy"],
        "probe_completeness": pm["completeness"], "best_heldout_auroc_by_concept": matched,
        "n_train": len(tr), "n_test": len(te), "target": spec.target, "pool": spec.pool,
        "measured_on": f"names chosen on {len(tr)} training texts; AUROCs, accuracies and completeness on the "
                       f"{len(te)} held-out texts (the probe bottleneck's split)"},
        extra={"summary": summary, "weights": weights})


def estimate(plan) -> Estimate:
    """The labelled texts' activations (a forward that stops before the unembedding), the model's choice on them
    (a forward with its logits), every token encoded; the heads' fits (scikit-learn) and the AUROCs."""
    spec, s = plan.spec, plan.shape
    lengths = plan.lengths(spec.max_sentences, spec.drop_last)  # the texts as the model tokenises them
    n, tokens = len(lengths), sum(lengths)
    P = tokens / max(1, n)
    return Estimate(parts={"activations and pooled features": tokens * s.d_model * 4 * 2 + 4 * n * spec.width * 8},
                    upstream=sae_upstream(plan) + [input_estimate(estimate_bottleneck, Plan(
                        s, probe_bottleneck_spec(spec), plan.handle, plan.dataset, plan.get_stored))],
                    flops=(s.forward_flops(n, P, logits_pos=0) + s.forward_flops(n, P)
                           + 2.0 * tokens * s.d_model * spec.width),
                    blocks=2 * s.batched_calls(lengths) + s.calls(40),
                    extra_seconds=(SAGA_SECONDS * 0.8 * n * (spec.width + 4 * spec.n_random)  # the heads
                                   + 3e-6 * n * spec.width),  # AUROCs of every feature
                    lower="max_sentences or width")
