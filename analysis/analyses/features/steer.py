"""A prompt through an SAE: which features fire on each of its tokens (search by text), and steering — add a
feature's decoder direction (or a concept probe's direction) at the SAE's hook point, or clamp or ablate the
feature inside the SAE with its error term kept, and compare the next-token distribution and a greedy
continuation before and after."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kernels.sae import splice_hook

from ...errors import WorkbenchError
from ...estimate import Estimate
from ...result import Progress, Result, no_progress, sub_progress
from ...session import ModelSession
from ...specs import PromptSpec, param
from ...tokens import single_token_ids
from ..concepts.compute import direction as probe_direction
from ..concepts.compute import probes_spec
from .browse import token_strings
from .sae import SKIP_FIRST, SAESpec, sae_from_result, sae_upstream


@dataclass(frozen=True)
class FeatureEncodeSpec(SAESpec, PromptSpec):
    """The features an SAE finds on each token of a prompt."""

    analysis: ClassVar[str] = "sae_encode"
    title: ClassVar[str] = "Features on a prompt: the SAE's strongest features at every token"
    prompt: str = param("The capital of France is Paris.", "the prompt text", max_len=20_000)
    per_token: int = param(8, "features kept per token (the strongest)", min=1, max=256)

    def validate(self) -> None:
        PromptSpec.validate(self)
        SAESpec.validate(self)


def compute_encode(session: ModelSession, spec: FeatureEncodeSpec, inputs, progress) -> Result:
    sae, _ = sae_from_result(inputs["sae"].result)
    sae = sae.to(session.device)
    ids = list(spec.token_ids)
    with torch.no_grad():
        _, cache = session.run_with_cache(session.tensor(ids), [spec.hook_name])
        acts = sae.encode(cache[spec.hook_name][0].float())  # [P, W]
    vals, feats = acts.topk(min(spec.per_token, sae.d_sae), dim=-1)
    names = token_strings(session, ids)
    rows = [{"position": p, "token": names[p], "rank": r, "feature": int(feats[p, r]), "activation": float(vals[p, r])}
            for p in range(len(ids)) for r in range(feats.shape[1]) if vals[p, r] > 0]
    table = pd.DataFrame(rows, columns=["position", "token", "rank", "feature", "activation"])
    skip = int(SKIP_FIRST)
    table = table[table["position"] >= skip].reset_index(drop=True)  # position 0 is never an SAE input
    totals = table.groupby("feature", as_index=False).agg(total=("activation", "sum"), peak=("activation", "max"),
                                                          tokens=("position", "size"))
    return Result(table=table, meta={"n_tokens": len(ids), "tokens": names, "first_position_skipped": bool(skip)},
                  extra={"by_feature": totals.sort_values("total", ascending=False).reset_index(drop=True)})


# ----------------------------------------------------------------------------------------------------------
# Steering
# ----------------------------------------------------------------------------------------------------------
MODES = ("add", "clamp", "ablate")


@dataclass(frozen=True)
class SteerSpec(SAESpec, PromptSpec):
    """Steer the model with a feature (or a probe direction) and compare its output before and after."""

    analysis: ClassVar[str] = "sae_steer"
    title: ClassVar[str] = "Steering: add a feature's direction, clamp or ablate it; the output before and after"
    prompt: str = param("I think the weather today is", "the prompt text", max_len=20_000)
    feature: int = param(0, "the SAE feature", min=0, max=10_000_000)
    mode: str = param("add", "add: strength x the feature's decoder direction (or the probe's unit direction) to "
                             "the activation; clamp: the feature's activation set to strength inside the SAE "
                             "(error term kept); ablate: set to 0", choices=MODES)
    strength: float = param(8.0, "how much (activation units: the residual's own scale)", min=-1e4, max=1e4)
    steer_with: str = param("feature", "feature: the SAE feature; probe: a concept probe's direction at the SAE's "
                                       "layer (mode add)", choices=("feature", "probe"))
    dataset: str = param("shipped", "concept data of the probe ('shipped' or an uploaded CSV's id)", max_len=64)
    concept: str = param("sentiment", "the probe's concept", max_len=128)
    toward: str = param("", "the class the probe direction points to (empty: the probe's own)", max_len=128)
    where: str = param("all", "all: every position after BOS (generated ones too); last: the prompt's last only",
                       choices=("all", "last"))
    generate: int = param(16, "tokens generated greedily before and after", min=0, max=128)
    top: int = param(12, "next tokens listed", min=1, max=100)
    answer: str = param("", "optional: a token whose logit difference against `wrong` is the metric", max_len=64)
    wrong: str = param("", "optional: the other token of the metric", max_len=64)

    def validate(self) -> None:
        PromptSpec.validate(self)
        SAESpec.validate(self)
        if self.steer_with == "probe" and self.mode != "add":
            raise WorkbenchError("A probe direction is added (mode add); clamping and ablating are for features.")
        if bool(self.answer) != bool(self.wrong):
            raise WorkbenchError("Give both tokens of the metric (answer and wrong), or neither.")

    def resolve(self, model) -> "SteerSpec":
        spec = SAESpec.resolve(self, model)
        if spec.feature >= spec.width:
            raise WorkbenchError(f"Feature {spec.feature} does not exist: this SAE has features 0 to "
                                 f"{spec.width - 1}.")
        if spec.steer_with == "probe" and spec.site not in ("resid_post", "resid_pre"):
            raise WorkbenchError(f"Probe directions live in the residual stream; this SAE reads {spec.site}.",
                                 hint="Use an SAE on resid_post or resid_pre, or steer with a feature.")
        if spec.answer:
            single_token_ids(model, [spec.answer, spec.wrong], "metric token")
        return spec

    @property
    def probe_layer(self) -> int:
        """The probe layer ("residual after block l") of this SAE's hook point."""
        return self.layer if self.site == "resid_post" else self.layer - 1


# The default strength, scaled to the feature: STRENGTH_MULTIPLE times the largest push the feature makes itself on
# the SAE's training text (its max activation times its decoder row's norm; for a clamp, its max activation), and no
# less than that multiple of the median live feature's (a rare, weak feature would otherwise move nothing). A fixed
# 8 moved little (KL 0.0003 nats for feature 0 of the default SAE). Measured on the default model's default SAE
# (blocks.2.hook_resid_post, 512 features, k 16, 1500 steps; 511 live; max activations 0.3 to 18, median 4.9; the
# residual's norm at that layer 19 to 29), adding at every position after BOS, each live feature on four prompts
# ("I think the weather today is", "The capital of France is", "She opened the door and", "The food was"): with
# this rule KL(before || after) at the last position has median 0.66 nats, is >= 0.05 nats for 75% and > 2 nats for
# 38%, and the top token changes for 77% (the strongest feature, 72: 2.9 nats); a fixed 8 gave a median of 0.005
# nats (25% >= 0.05), 2x the feature's push 0.008, 4x without the floor 0.16. On the page tests' small SAE (64
# features, k 4, 150 steps; max activations median 11) the rule's median is 6.6 nats: the features of a smaller k
# each carry more of the residual. A probe's unit direction gets the multiple of the median live feature's push
# (19.5 on the default SAE): the sentiment probe moves "The food was" by 2.7 nats toward negative and 3.4 toward
# positive (top token ' quiet' -> ' excellent'), the default prompt by 0.04 (' Belgrade' -> ' awful') and 0.004.
STRENGTH_MULTIPLE = 4.0
STRENGTH_STEP = 0.5  # the page's slider step: a default lands on it


def strongest_live_feature(per_feature: pd.DataFrame) -> int:
    """The live feature with the largest activation in an SAE's per-feature table (its run's table, measured on
    its training text); 0 when none is live."""
    live = per_feature[per_feature["max_activation"] > 0]
    if "dead" in live:
        live = live[~live["dead"].astype(bool)]
    return int(live.sort_values("max_activation", ascending=False)["feature"].iloc[0]) if len(live) else 0


def default_strength(per_feature: pd.DataFrame, feature: int, steer_with: str = "feature",
                     mode: str = "add") -> float:
    """The strength the page starts from (see STRENGTH_MULTIPLE) for an SAE's per-feature table, rounded to the
    slider's step. Adding a feature's direction: the multiple of its largest push (max activation x decoder norm);
    clamping: the multiple of its max activation; either at least the multiple of the median live feature's. A
    probe's unit direction: the multiple of the median live feature's push. Ablating takes none (0)."""
    if mode == "ablate" and steer_with == "feature":
        return 0.0
    table = per_feature.assign(decoder_norm=per_feature["decoder_norm"] if "decoder_norm" in per_feature else 1.0)
    live = table[table["max_activation"] > 0]
    column = live["max_activation"] if mode == "clamp" else live["max_activation"] * live["decoder_norm"]
    typical = float(column.median()) if len(live) else 1.0
    row = live[live["feature"] == feature]
    own = 0.0
    if steer_with == "feature" and len(row):
        own = float(row["max_activation"].iloc[0] * (1.0 if mode == "clamp" else row["decoder_norm"].iloc[0]))
    scale = max(own, typical)
    return max(STRENGTH_STEP, round(STRENGTH_MULTIPLE * scale / STRENGTH_STEP) * STRENGTH_STEP)


def steer_probes_spec(spec: SteerSpec, inputs=None):
    if spec.steer_with != "probe":
        return None
    from types import SimpleNamespace

    return probes_spec(SimpleNamespace(model=spec.model, revision=spec.revision, dtype=spec.dtype,
                                       dataset=spec.dataset, position="last", max_sentences=2000), (spec.concept,))


def _greedy(session: ModelSession, ids: list[int], n: int, hooks, progress: Progress = no_progress) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for i in range(n):
            if len(out) >= session.summary.n_ctx:
                break
            progress(i / n, f"token {i + 1} of {n}")
            logits = session.run_with_hooks(session.tensor(out), hooks)[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


def compute_steer(session: ModelSession, spec: SteerSpec, inputs, progress) -> Result:
    sae, _ = sae_from_result(inputs["sae"].result)
    sae = sae.to(session.device)
    ids = list(spec.token_ids)
    skip = int(SKIP_FIRST)
    hook = spec.hook_name
    f = spec.feature
    if spec.steer_with == "probe":
        w, _, cls = probe_direction(inputs["probes"].result, spec.concept, spec.probe_layer, spec.toward or None)
        vec = torch.as_tensor(w / np.linalg.norm(w), dtype=torch.float32, device=session.device)
        what = f"probe direction of {spec.concept!r} toward {cls!r} at layer {spec.probe_layer}"
    else:
        vec = sae.W_dec[f].detach() / sae.W_dec[f].detach().norm().clamp(min=1e-12)
        what = f"feature {f}'s decoder direction"

    def positions(x: torch.Tensor) -> torch.Tensor:
        """[P] mask of the positions steered."""
        mask = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        if spec.where == "last":
            mask[len(ids) - 1] = True  # the prompt's last token (generated tokens come after it)
        else:
            mask[skip:] = True
        return mask

    if spec.mode == "add":
        def steer(x, hook=None):
            m = positions(x)[None, :, None]
            return x + m * (spec.strength * vec).to(x.dtype)
    else:
        value = 0.0 if spec.mode == "ablate" else spec.strength

        def edit(acts):
            acts = acts.clone()
            m = positions(acts)
            acts[:, m, f] = value
            return acts
        spliced = splice_hook(sae, keep_error=True, edit=edit)

        def steer(x, hook=None):
            return spliced(x)
        what = f"feature {f} {'ablated (0)' if spec.mode == 'ablate' else f'clamped to {spec.strength:g}'}"
    hooks = [(hook, steer)]
    progress(0.2, "next-token distribution")
    with torch.no_grad():
        toks = session.tensor(ids)
        logits_before, cache = session.run_with_cache(toks, [hook])
        before = logits_before[0, -1].float()
        after = session.run_with_hooks(toks, hooks)[0, -1].float()
        feature_acts = sae.encode(cache[hook][0].float())[:, f].cpu().numpy() if spec.steer_with == "feature" else None
    lp_b, lp_a = before.log_softmax(-1), after.log_softmax(-1)
    kl = float((lp_b.exp() * (lp_b - lp_a)).sum())
    top = sorted(set(lp_b.topk(spec.top).indices.tolist()) | set(lp_a.topk(spec.top).indices.tolist()))
    names = token_strings(session, top)
    table = pd.DataFrame({"token_id": top, "token": names, "p_before": lp_b.exp()[top].cpu().numpy(),
                          "p_after": lp_a.exp()[top].cpu().numpy(), "logit_before": before[top].cpu().numpy(),
                          "logit_after": after[top].cpu().numpy()})
    table["change"] = table["p_after"] - table["p_before"]
    table = table.sort_values("p_after", ascending=False).reset_index(drop=True)
    first_b, first_a = token_strings(session, [int(lp_b.argmax()), int(lp_a.argmax())])
    meta = {"kl_before_after": kl, "steered": what, "mode": spec.mode, "hook_name": hook, "top_before": first_b,
            "top_after": first_a}
    if spec.answer:
        a, b = single_token_ids(session, [spec.answer, spec.wrong], "metric token")
        meta.update(metric="logit difference " + repr(spec.answer) + " - " + repr(spec.wrong),
                    metric_before=float(before[a] - before[b]), metric_after=float(after[a] - after[b]))
    if feature_acts is not None:
        meta["feature_activation"] = [float(v) for v in feature_acts]
    if spec.generate:
        gen_b = _greedy(session, ids, spec.generate, [], progress=sub_progress(progress, 0.3, 0.65, "generating: "))
        gen_a = _greedy(session, ids, spec.generate, hooks,
                        progress=sub_progress(progress, 0.65, 1.0, "generating, steered: "))
        meta.update(generated_before=session.tokenizer.decode(gen_b), generated_after=session.tokenizer.decode(gen_a))
    return Result(table=table, meta=meta)


def estimate_prompt(plan) -> Estimate:
    """A few forwards of one prompt (and the greedy continuation: one forward per generated token)."""
    spec, s = plan.spec, plan.shape
    P = max(1, len(spec.token_ids) or len(spec.prompt) // 3 + 2)
    n = 3 + 2 * getattr(spec, "generate", 0)
    return Estimate(parts={"forward": s.forward_bytes(1, P + getattr(spec, "generate", 0))},
                    flops=n * s.forward_flops(1, P + getattr(spec, "generate", 0)), lower="generate",
                    blocks=s.calls(n),
                    upstream=sae_upstream(plan))
