"""Concept interventions: push the residual stream along a concept direction and watch the output move.

The direction is a probe's (`concepts.Probe`, toward one class of the concept) at a chosen layer, as a unit
vector u in activation space. An amount a adds a * r * u to the residual after block `layer` (the embedding for
-1) at every position after BOS or at the last one, where r is the mean norm of that residual over the dataset's
texts: amounts are fractions of a typical residual, whatever the model's scale. (The spread of the concept score
itself is no unit: a standardised probe leans on low-variance dimensions, along which the texts hardly differ.)
All amounts run in one batched forward; for each, the top tokens at the last position and the probabilities of two
groups of tracked tokens (e.g. positive and negative words): the dose-response curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ... import concept_data
from ...errors import WorkbenchError
from ...estimate import Estimate, Plan, input_estimate
from ...result import Progress, Result, no_progress, sub_progress
from ...session import ModelSession, check_layer, resid_after_name
from ...specs import PromptSpec, param
from ...tokens import single_token_ids
from ..concepts.compute import (
    FIT_SECONDS,
    POSITIONS,
    activations_array,
    direction,
    estimate_probes,
    fit_probe,
    probes_spec,
    split,
    stored_activations,
)

POSITIVE = (" lovely", " great", " delightful", " excellent", " wonderful", " pleasant")
NEGATIVE = (" dreadful", " horrible", " disappointing", " terrible", " boring", " awful")
AMOUNTS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class InterventionSpec(PromptSpec):
    """Move the residual along a concept direction by several amounts; the model's output at each."""

    analysis: ClassVar[str] = "intervention"
    title: ClassVar[str] = "Concept intervention: the model's output as the residual moves along a concept"
    display_only: ClassVar[dict[str, str]] = {"prompt": "token_ids"}
    prompt: str = param("The weather is very", "the prompt text", max_len=20_000)
    dataset: str = param("shipped", "'shipped' or the id of an uploaded concept CSV (the probes' texts)", max_len=64)
    concept: str = param("sentiment", "the concept to push along", max_len=128)
    toward: str = param("", "the class the direction points to (empty: the probe's own: the second class of a "
                         "binary concept in sorted order, the first of a multi-class one)", max_len=128)
    layer: int = param(-2, "residual pushed: after block `layer`, -1 the embedding, -2 the last block (where "
                        "pushes act on the output most directly)", min=-2, max=1024)
    where: str = param("all", "all: every position after BOS; last: the last position only", choices=("all", "last"))
    amounts: tuple[float, ...] = param(AMOUNTS, "amounts, as fractions of the layer's mean residual norm",
                                    min=-1000.0, max=1000.0, max_len=64)
    tokens_up: tuple[str, ...] = param(POSITIVE, "tracked tokens expected to rise (one token each)", max_len=64)
    tokens_down: tuple[str, ...] = param(NEGATIVE, "tracked tokens expected to fall (one token each)", max_len=64)
    top_k: int = param(10, "top tokens kept per amount", min=1, max=100)
    position: str = param("mean", "token position of the probes' activations", choices=POSITIONS)
    max_sentences: int = param(2000, "texts the probes use", min=20, max=concept_data.MAX_ROWS)
    refits: int = param(20, "the probe refitted on this many bootstrap resamples of its training texts, for the "
                            "curve's interval (0: none)", min=0, max=200)

    def validate(self) -> None:
        super().validate()
        if not self.amounts:
            raise WorkbenchError("Give at least one amount.")

    def resolve(self, model) -> "InterventionSpec":
        if self.layer != -2:
            check_layer(self.layer, model.summary.n_layers)
        return self


def pushed_logits(session: ModelSession, ids: list[int], layer: int, vector: torch.Tensor, amounts, where: str):
    """[A, vocab] float32 logits at the last position with amounts[a] * vector added at the layer's residual."""
    A = len(amounts)
    toks = session.tensor([ids] * A)
    shift = torch.tensor(amounts, dtype=torch.float32, device=session.device)[:, None] * vector.to(session.device)

    def hook(resid, hook):
        resid = resid.clone()
        d = shift.to(resid.dtype)[:, None, :]
        if where == "all":
            resid[:, 1:] += d
        else:
            resid[:, -1:] += d
        return resid

    with torch.no_grad():
        logits = session.run_with_hooks(toks, fwd_hooks=[(resid_after_name(layer), hook)])
    return logits[:, -1].float().cpu()


def refit_directions(acts_result: Result, spec: InterventionSpec, layer: int, cls: str,
                     progress: Progress = no_progress) -> np.ndarray:
    """[refits, d] unit directions toward `cls`: the probe refitted on bootstrap resamples of its training texts
    (the same split as the stored probes), so the curve's spread shows how much it depends on which texts the
    probe saw. `progress` hears of each refit."""
    pspec = probes_spec(spec, (spec.concept,))
    X = activations_array(acts_result)[:, layer + 1].astype(np.float64)
    y = acts_result.extra["labels"][spec.concept].astype(str).to_numpy()
    tr, te = split(len(X), pspec.test_fraction, pspec.seed)
    rng = np.random.default_rng(pspec.seed)
    out = []
    while len(out) < spec.refits:
        progress(len(out) / spec.refits, f"probe refit {len(out) + 1} of {spec.refits}")
        idx = rng.choice(tr, size=len(tr), replace=True)
        if len(np.unique(y[idx])) < len(np.unique(y[tr])):
            continue  # a resample that lost a class cannot point toward it
        probe = fit_probe(X[idx], y[idx], X[te], y[te], pspec.C, pspec.seed)
        if len(probe.classes) == 2:
            w = probe.weight[0] if cls == probe.rows[0] else -probe.weight[0]
        else:
            w = probe.weight[probe.rows.index(cls)]
        out.append(w / np.linalg.norm(w))
    return np.asarray(out).reshape(len(out), X.shape[1])


def _log_odds(probs: torch.Tensor, up: list[int], down: list[int]) -> np.ndarray:
    return (probs[:, up].sum(-1).log() - probs[:, down].sum(-1).log()).numpy()


def compute(session: ModelSession, spec: InterventionSpec, inputs, progress) -> Result:
    ids = list(spec.token_ids)
    if len(ids) < 2:
        raise WorkbenchError("The prompt has no token after BOS to push.")
    up = single_token_ids(session, spec.tokens_up, "tracked token")
    down = single_token_ids(session, spec.tokens_down, "tracked token")
    n_layers = session.n_layers
    probes = inputs["probes"].result
    layer = n_layers - 1 if spec.layer == -2 else spec.layer
    w, _, cls = direction(probes, spec.concept, layer, spec.toward or None)
    norm = float(np.linalg.norm(w))
    acts = activations_array(inputs["activations"].result)[:, layer + 1].astype(np.float64)
    scale = float(np.linalg.norm(acts, axis=1).mean())
    unit = torch.tensor(w / norm, dtype=torch.float32)
    progress(0.05, "pushed forwards")
    amounts = [float(a) for a in spec.amounts]
    logits = pushed_logits(session, ids, layer, unit * scale, amounts, spec.where)
    probs = logits.softmax(-1)
    tok = session.tokenizer
    rows = []
    for a, amount in enumerate(amounts):
        for group, tids, texts in (("up", up, spec.tokens_up), ("down", down, spec.tokens_down)):
            for t, text in zip(tids, texts):
                rows.append({"amount": amount, "group": group, "token": text, "token_id": t,
                             "prob": float(probs[a, t]), "logit": float(logits[a, t])})
    table = pd.DataFrame(rows)
    groups = table.groupby(["amount", "group"], sort=False)["prob"].sum().unstack("group").reset_index()
    groups["log_odds"] = np.log(groups["up"]) - np.log(groups["down"])
    interval_meta = {}
    if spec.refits:
        dirs = refit_directions(inputs["activations"].result, spec, layer, cls,
                                progress=sub_progress(progress, 0.1, 0.8))  # the fits: most of the run
        curves = []
        for k, d in enumerate(dirs):
            progress(0.8 + 0.2 * k / len(dirs), f"pushed forwards of refit {k + 1} of {len(dirs)}")
            curves.append(_log_odds(pushed_logits(session, ids, layer, torch.tensor(d, dtype=torch.float32) * scale,
                                                  amounts, spec.where).softmax(-1), up, down))
        curves = np.stack(curves)
        groups["log_odds_low"], groups["log_odds_high"] = np.quantile(curves, [0.025, 0.975], axis=0)
        order = np.argsort(amounts)
        rising = (np.diff(curves[:, order], axis=1) > 0).all(1)
        interval_meta = {"refits": len(dirs), "monotone_refits": float(rising.mean()),
                         "statistics": f"log-odds band: 2.5-97.5 percentiles over {len(dirs)} probes refitted on "
                                       "bootstrap resamples of the probe's training texts; monotone_refits: the "
                                       "fraction of those probes whose curve rises at every step"}
    top_p, top_i = probs.topk(spec.top_k, -1)
    top = pd.DataFrame([{"amount": amounts[a], "rank": r + 1, "token": tok.decode([int(top_i[a, r])]),
                         "token_id": int(top_i[a, r]), "prob": float(top_p[a, r])}
                        for a in range(len(amounts)) for r in range(spec.top_k)])
    acc = probes.table.query("concept == @spec.concept and layer == @layer").iloc[0]
    return Result(table=table, meta={"layer": layer, "toward": cls, "residual_norm": scale,
                                     "probe_accuracy": float(acc["accuracy"]),
                                     "probe_accuracy_low": float(acc.get("accuracy_low", np.nan)),
                                     "probe_accuracy_high": float(acc.get("accuracy_high", np.nan)),
                                     "concept": spec.concept, "where": spec.where, **interval_meta},
                  extra={"groups": groups, "top": top})


def estimate(plan) -> Estimate:
    """The stored activations read back (for the layer's mean norm), one forward of the prompt per amount in one
    batch (logits at every position), and the probes (with their activations) when not stored yet."""
    spec, s, P = plan.spec, plan.shape, plan.n_tokens()
    n = len(plan.lengths(spec.max_sentences))
    A = len(spec.amounts)
    upstream = input_estimate(estimate_probes, Plan(s, probes_spec(spec, (spec.concept,)), plan.handle, plan.dataset,
                                    plan.get_stored))
    n_train = int(n * (1 - probes_spec(spec, (spec.concept,)).test_fraction))
    return Estimate(parts={"activations and forward": stored_activations(s, n, s.forward_bytes(A, P, P, 2))},
                    flops=(1 + spec.refits) * s.forward_flops(A, P) + s.vocab_flops(A * P, 2 + 2 * spec.refits),
                    blocks=s.calls(1 + spec.refits), lower="amounts, refits or max_sentences",
                    extra_seconds=spec.refits * FIT_SECONDS * n_train * s.d_model * 3,  # a probe fit per refit
                    upstream=[upstream])
