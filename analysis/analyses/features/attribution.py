"""Feature attribution: which SAE features (at which positions) carry a behaviour on clean/corrupted prompt pairs.

The SAE is spliced in at its hook point with its error term kept (x -> decode(encode(x)) + (x - that), the
model's output unchanged), so its features are nodes of the model's graph. For each pair and each node
(position, feature), with the metric M the logit difference answer - wrong at the last position:

    activation patching   M(base run with this one feature at its source-run value) - M(base run)
    AtP                   (a_source - a_base) * dM/da             gradient on the base run
    RelP                  the same with the LRP rules of kernels/attribution.py in the backward pass

Direction "denoise": base = corrupted, source = clean (clean features patched into the corrupted run); "noise" the
other way. Nodes whose activation is the same in both runs (most features are zero in both) have zero effect
under every method and are not listed; position 0 is not a node when it is a BOS token. Activation patching runs
for up to `max_patched` nodes per pair (those with the largest |AtP|); the correlations are over those.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kernels.attribution import LRPRules, lrp_hooks
from kernels.sae import splice_hook

from ...estimate import Estimate, ceil_div
from ...result import Result
from ...session import ModelSession
from ...specs import param
from ...stats import pearson
from ..patching.spec import DIRECTIONS, MAX_PAIRS, RELP_RULES, PromptPairs, pair_ids_or_guess, resolve_pairs
from .browse import token_strings
from .sae import SKIP_FIRST, SAESpec, sae_from_result, sae_upstream

METHODS = ("activation", "atp", "relp")
BATCH = 64  # patched runs per forward


@dataclass(frozen=True)
class FeatureAttributionSpec(PromptPairs, SAESpec):
    """AtP and RelP scores of SAE features on prompt pairs, checked against patching the features themselves."""

    analysis: ClassVar[str] = "sae_attribution"
    title: ClassVar[str] = "Feature attribution: AtP and RelP of SAE features, checked by patching them"
    n_pairs: int = param(4, "how many shipped pairs (the first ones of the first pair's token length)", min=1,
                         max=MAX_PAIRS)
    direction: str = param("denoise", "denoise: clean features into the corrupted run; noise: the reverse",
                           choices=DIRECTIONS)
    relp_rules: tuple[str, ...] = param(("ln", "identity", "half"), "LRP rules for RelP", choices=RELP_RULES,
                                        max_len=len(RELP_RULES))
    max_patched: int = param(2000, "nodes patched per pair (those with the largest |AtP|)", min=1, max=100_000)

    def validate(self) -> None:
        SAESpec.validate(self)
        self.validate_pairs()

    def resolve(self, model) -> "FeatureAttributionSpec":
        return resolve_pairs(SAESpec.resolve(self, model), model)


def _metric(answer: int, wrong: int):
    return lambda logits: logits[:, -1, answer] - logits[:, -1, wrong]  # [rows]


def _gradient_scores(session: ModelSession, sae, hook: str, base: torch.Tensor, metric, lrp: LRPRules | None):
    """(base feature activations [P, W], dM/da [P, W], M) on the base run, the SAE spliced in with its error."""
    rec: dict = {}
    hooks = (lrp_hooks(session.bridge, lrp) if lrp is not None else []) + [
        (hook, splice_hook(sae, keep_error=True, record=rec))]
    import warnings

    with session.frozen(), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*edited hook_scale/hook_normalized.*")
        m = metric(session.run_with_hooks(base, hooks).float())
        m.sum().backward()
    return rec["acts"].detach()[0], rec["acts"].grad[0], float(m[0].detach())


def compute(session: ModelSession, spec: FeatureAttributionSpec, inputs, progress) -> Result:
    sae, _ = sae_from_result(inputs["sae"].result)
    sae = sae.to(session.device)
    for p in sae.parameters():
        p.requires_grad_(False)
    hook, skip = spec.hook_name, int(SKIP_FIRST)
    pairs = json.loads(spec.pairs)
    rules = LRPRules(**{r: r in spec.relp_rules for r in RELP_RULES})
    frames, base_ms, source_ms = [], [], []
    for i, pair in enumerate(pairs):
        progress(0.05 + 0.9 * i / len(pairs), f"pair {i + 1} of {len(pairs)}: gradients")
        clean, corrupted = pair["clean_ids"], pair["corrupted_ids"]
        base_ids, src_ids = (corrupted, clean) if spec.direction == "denoise" else (clean, corrupted)
        base, src = session.tensor(base_ids), session.tensor(src_ids)
        metric = _metric(pair["answer_id"], pair["wrong_id"])
        rec: dict = {}
        with torch.no_grad():
            src_m = float(metric(session.run_with_hooks(src, [(hook, splice_hook(sae, keep_error=True,
                                                                                   record=rec))]).float())[0])
        a_src = rec["acts"][0]  # [P, W]
        a_base, grad, base_m = _gradient_scores(session, sae, hook, base, metric, None)
        progress(0.05 + 0.9 * (i + 0.1) / len(pairs), f"pair {i + 1} of {len(pairs)}: RelP gradients")
        _, grad_relp, _ = _gradient_scores(session, sae, hook, base, metric, rules)
        delta = a_src - a_base
        delta[:skip] = 0
        pos, feat = delta.nonzero(as_tuple=True)
        atp = (delta * grad)[pos, feat]
        relp = (delta * grad_relp)[pos, feat]
        order = atp.abs().argsort(descending=True)
        patched = torch.full((len(pos),), float("nan"))
        chosen = order[:spec.max_patched]
        with torch.no_grad():
            for c in range(0, len(chosen), BATCH):  # the gradients about a fifth of a pair, the patches the rest
                progress(0.05 + 0.9 * (i + 0.2 + 0.8 * c / len(chosen)) / len(pairs),
                         f"pair {i + 1} of {len(pairs)}: patching features {c + 1:,} to "
                         f"{min(c + BATCH, len(chosen)):,} of {len(chosen):,}")
                idx = chosen[c:c + BATCH]
                R = len(idx)
                rows_pos, rows_feat = pos[idx], feat[idx]
                values = a_src[rows_pos, rows_feat]

                def edit(acts, rows_pos=rows_pos, rows_feat=rows_feat, values=values):
                    acts = acts.clone()
                    acts[torch.arange(acts.shape[0]), rows_pos, rows_feat] = values
                    return acts
                out = session.run_with_hooks(base.repeat(R, 1), [(hook, splice_hook(sae, keep_error=True,
                                                                                     edit=edit))]).float()
                patched[idx] = (metric(out) - base_m).cpu()
        tokens = token_strings(session, base_ids)
        frames.append(pd.DataFrame({"pair": i, "position": pos.cpu().numpy(),
                                    "token": [tokens[p] for p in pos.tolist()], "feature": feat.cpu().numpy(),
                                    "delta": delta[pos, feat].cpu().numpy(), "activation": patched.numpy(),
                                    "atp": atp.cpu().numpy(), "relp": relp.cpu().numpy()}))
        base_ms.append(base_m)
        source_ms.append(src_m)
    table = pd.concat(frames, ignore_index=True)
    done = table.dropna(subset=["activation"])
    corr = {m: pearson(done[m].to_numpy(), done["activation"].to_numpy()) if len(done) > 2 else float("nan")
            for m in ("atp", "relp")}
    by_feature = (table.groupby("feature", as_index=False)[["activation", "atp", "relp"]].sum(min_count=1)
                  .assign(**{c: lambda t, c=c: t[c] / len(pairs) for c in ("activation", "atp", "relp")}))
    by_feature = by_feature.reindex(by_feature["atp"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    return Result(table=table, meta={
        "pearson_atp": corr["atp"], "pearson_relp": corr["relp"], "n_nodes": len(table), "n_patched": len(done),
        "n_pairs": len(pairs), "metric": "logit difference answer - wrong at the last position",
        "base_metric_mean": float(np.mean(base_ms)), "source_metric_mean": float(np.mean(source_ms)),
        "hook_name": hook, "direction": spec.direction,
        "measured_on": f"{len(pairs)} prompt pairs; Pearson r over the {len(done)} patched (pair, position, "
                       "feature) nodes"},
        extra={"by_feature": by_feature})


def estimate(plan) -> Estimate:
    spec, s = plan.spec, plan.shape
    pairs = json.loads(spec.pairs) if spec.pairs else [None] * spec.n_pairs
    P = 16 if pairs[0] is None else len(pair_ids_or_guess(pairs[0]))
    k = spec.k if spec.architecture == "topk" else 64
    nodes = min(spec.max_patched, 2 * k * P)
    W = spec.width
    sae_batch = 6 * BATCH * P * W * 4  # the SAE inside a batch of patched runs: pre-activations, top-k, edits
    return Estimate(parts={"backward, or a batch of patched runs": max(s.backward_bytes(1, P) + 6 * P * W * 4,
                                                                       s.forward_bytes(BATCH, P, P) + sae_batch)},
                    flops=len(pairs) * (2 * s.backward_flops(1, P) + s.forward_flops(1, P)
                                        + nodes * s.forward_flops(1, P) + 2.0 * (nodes + 3) * P * s.d_model * W),
                    blocks=len(pairs) * (s.calls(7) + ceil_div(nodes, BATCH) * s.calls(1)),
                    lower="n_pairs or max_patched", upstream=sae_upstream(plan))
