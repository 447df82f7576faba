"""Patching: which components carry a behaviour, measured on clean/corrupted prompt pairs.

    spec = PatchingSpec(dataset="ioi", n_pairs=8, components=("resid_pre", "z_all_pos"))
    outcome = run(spec)          # tidy table: method, component, layer, pos, head, dest_pos, value

Estimators: activation patching (the ground truth; batched kernels in kernels/patching.py), attribution
patching (AtP), relevance patching (RelP, LRP rules in the backward pass) and layer integrated gradients
(Captum) on the same hook points (kernels/attribution.py). Metrics are read
at the final position: logit difference between the answer and the wrong answer (raw, or normalised so the
unpatched base run is 0 and the other run is 1), the answer's probability, and the KL divergence from the clean
run's next-token distribution.

Directions: "denoise" patches clean activations into the corrupted run (TransformerLens's convention);
"noise" patches corrupted activations into the clean run.
"""
from __future__ import annotations

import json

import pandas as pd
import torch

from kernels.attribution import LRPRules, attribution_scores, integrated_gradients
from kernels.patching import ACTIVATIONS, BlockRunner, activation_patch_sweep, source_activations

from ...errors import WorkbenchError
from ...result import Result
from ...session import ModelSession
from ...stats import pearson
from ...tokens import tokenize
from .spec import RELP_RULES, PatchingSpec


# ----------------------------------------------------------------------------------------------------------
# Metrics on final-position logits, rows laid out (patch, prompt)
# ----------------------------------------------------------------------------------------------------------
class Metric:
    """Per-row metric on final-position logits [rows, d_vocab]; rows are (patch, prompt)."""

    def __init__(self, name: str, answer: torch.Tensor, wrong: torch.Tensor, clean_logprobs: torch.Tensor,
                 base_value: float = 0.0, other_value: float = 1.0):
        self.name, self.answer, self.wrong = name, answer, wrong
        self.clean_logprobs = clean_logprobs  # [B, d_vocab]
        self.base_value, self.other_value = base_value, other_value

    def raw(self, logits: torch.Tensor) -> torch.Tensor:
        B = self.answer.shape[0]
        n = logits.shape[0] // B
        ans, wrong = self.answer.repeat(n)[:, None], self.wrong.repeat(n)[:, None]
        if self.name in ("logit_diff", "logit_diff_normalized"):
            return (logits.gather(1, ans) - logits.gather(1, wrong))[:, 0]
        logp = logits.float().log_softmax(-1)
        if self.name == "answer_prob":
            return logp.gather(1, ans)[:, 0].exp()
        ref = self.clean_logprobs.repeat(n, 1)
        return (ref.exp() * (ref - logp)).sum(-1)  # KL(clean || patched)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.raw(logits)

    def finish(self, mean_values: torch.Tensor) -> torch.Tensor:
        """Batch-mean values -> reported values (normalisation works on batch means, as in the IOI papers)."""
        if self.name != "logit_diff_normalized":
            return mean_values
        return (mean_values - self.base_value) / (self.other_value - self.base_value)


def compute(session: ModelSession, spec: PatchingSpec, inputs, progress) -> Result:
    pairs = json.loads(spec.pairs)
    dev = session.device
    clean = torch.tensor([p["clean_ids"] for p in pairs], device=dev)  # [B, P]
    corrupted = torch.tensor([p["corrupted_ids"] for p in pairs], device=dev)
    answer = torch.tensor([p["answer_id"] for p in pairs], device=dev)
    wrong = torch.tensor([p["wrong_id"] for p in pairs], device=dev)
    base_tokens, source_tokens = (corrupted, clean) if spec.direction == "denoise" else (clean, corrupted)
    bridge = session.bridge
    rows = []
    with torch.no_grad():  # attribution methods switch gradients on for their own pass
        runner = BlockRunner(bridge, base_tokens)  # records the base run's block inputs
        other = BlockRunner(bridge, source_tokens)
        base_logits, source_logits = runner.final_logits, other.final_logits  # [B, d_vocab]
        clean_logits = source_logits if spec.direction == "denoise" else base_logits
        metric = Metric(spec.metric, answer, wrong, clean_logits.float().log_softmax(-1))
        base_m = metric.raw(base_logits).mean().item()
        source_m = metric.raw(source_logits).mean().item()
        metric.base_value, metric.other_value = base_m, source_m
        if spec.metric == "logit_diff_normalized" and abs(source_m - base_m) < 1e-6:
            raise WorkbenchError("The clean and corrupted runs give the same logit difference, so it cannot be "
                                 "normalised.", hint="Pick the raw logit difference, or other pairs.")
        steps = len(spec.components) * len(spec.methods)
        step = 0
        for comp in spec.components:
            if comp == "resid_pre":
                source = {f"blocks.{layer}.hook_resid_pre": other.inputs[layer] for layer in other.inputs}
            else:
                source = source_activations(bridge, source_tokens, comp)
            for method in spec.methods:
                def report(done, total, step=step, comp=comp, method=method):
                    progress((step + done / total) / steps, f"{method} {comp}")

                if method == "activation":
                    sweep = activation_patch_sweep(runner, source, comp, metric, progress=report,
                                                   source_tokens=source_tokens)
                    values = metric.finish(sweep.values.float().mean(-1)).cpu()  # [layer, ...]
                    axes = sweep.axes
                else:
                    if method == "ig":
                        scores = integrated_gradients(bridge, base_tokens, source_tokens, [comp],
                                                      lambda logits: metric.raw(logits) / len(pairs),
                                                      n_steps=spec.ig_steps)[comp]
                    else:
                        rules = None if method == "atp" else LRPRules(**{r: r in spec.relp_rules for r in RELP_RULES})
                        with torch.enable_grad():
                            scores = attribution_scores(bridge, base_tokens, source, [comp],
                                                        lambda logits: metric.raw(logits).mean(), rules)[comp]
                    # the first-order estimate of the patched mean metric, reported like activation patching
                    values = metric.finish(base_m + scores.float().sum(-1)).cpu()
                    axes = ("layer",) + ACTIVATIONS[comp][1]
                    report(1, 1)
                rows.append(_tidy(values, axes, method, comp))
                step += 1
    table = pd.concat(rows, ignore_index=True)
    tokens = tokenize(session, clean[0].tolist())
    meta = {"n_pairs": len(pairs), "n_tokens": int(clean.shape[1]), "metric": spec.metric,
            "direction": spec.direction, "base_metric": base_m, "source_metric": source_m,
            "clean_metric": base_m if spec.direction == "noise" else source_m,
            "corrupted_metric": source_m if spec.direction == "noise" else base_m}
    extra = {"tokens": tokens}
    if "activation" in spec.methods and len(spec.methods) > 1:
        extra["faithfulness"] = faithfulness(table, spec.overlap_k)
    return Result(table=table, meta=meta, extra=extra)


def faithfulness(table: pd.DataFrame, top_k: int = 10) -> pd.DataFrame:
    """Each estimator against activation patching, per component: Pearson, Spearman, top-k overlap.

    The top-k overlap compares the k nodes with the largest |effect| under each method."""
    from scipy.stats import spearmanr

    key = ["component", "layer", "pos", "head", "dest_pos"]
    truth = table[table["method"] == "activation"]
    out = []
    for method in sorted(set(table["method"]) - {"activation"}):
        est = table[table["method"] == method]
        both = truth.merge(est, on=key, suffixes=("_act", "_est"))
        for comp, g in both.groupby("component", sort=False):
            g = g.dropna(subset=["value_act", "value_est"])
            k = min(top_k, len(g))
            row = {"method": method, "component": comp, "n_nodes": len(g), "top_k": k}
            if len(g) >= 3 and g["value_act"].std() > 0 and g["value_est"].std() > 0:
                row["pearson"] = pearson(g["value_act"], g["value_est"])
                row["spearman"] = float(spearmanr(g["value_act"], g["value_est"])[0])
            else:
                row["pearson"] = row["spearman"] = float("nan")
            top_act = set(g["value_act"].abs().nlargest(k).index)
            top_est = set(g["value_est"].abs().nlargest(k).index)
            row["top_k_overlap"] = len(top_act & top_est) / k if k else float("nan")
            out.append(row)
    return pd.DataFrame(out, columns=["method", "component", "n_nodes", "top_k", "pearson", "spearman",
                                      "top_k_overlap"])


def _tidy(values: torch.Tensor, axes: tuple[str, ...], method: str, component: str) -> pd.DataFrame:
    idx = torch.cartesian_prod(*[torch.arange(s) for s in values.shape]) if values.dim() > 1 else \
        torch.arange(values.shape[0])[:, None]
    df = pd.DataFrame(idx.numpy(), columns=list(axes))
    for col in ("pos", "head", "dest_pos"):
        if col not in df:
            df[col] = pd.NA
    df = df.astype({c: "Int64" for c in ("layer", "pos", "head", "dest_pos")})
    df.insert(0, "component", component)
    df.insert(0, "method", method)
    df["value"] = values.reshape(-1).numpy()
    return df[["method", "component", "layer", "pos", "head", "dest_pos", "value"]]
