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

import numpy as np
import pandas as pd
import torch

from kernels.attribution import LRPRules, attribution_scores, integrated_gradients
from kernels.patching import ACTIVATIONS, BlockRunner, activation_patch_sweep, source_activations

from ...errors import WorkbenchError
from ...estimate import ENTRY_FLOPS, Estimate, ceil_div
from ...result import Result
from ...session import ModelSession
from ...stats import (
    N_BOOT,
    bootstrap_interval,
    pearson,
    resample_weights,
    sign_flip_min_p,
    sign_flip_p,
    unreachable_note,
)
from ...tokens import tokenize
from .spec import RELP_RULES, PatchingSpec, pair_ids_or_guess


# ----------------------------------------------------------------------------------------------------------
# Metrics on final-position logits, rows laid out (patch, prompt)
# ----------------------------------------------------------------------------------------------------------
class Metric:
    """Per-row metric on final-position logits [rows, d_vocab]; rows are (patch, prompt)."""

    def __init__(self, name: str, answer: torch.Tensor, wrong: torch.Tensor, clean_logprobs: torch.Tensor):
        self.name, self.answer, self.wrong = name, answer, wrong
        self.clean_logprobs = clean_logprobs  # [B, d_vocab]

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


def finish(metric: str, mean_values: torch.Tensor, base: float, source: float) -> torch.Tensor:
    """Mean metric values -> reported values: the normalised logit difference is 0 at the unpatched base run and
    1 at the other run (normalisation works on means over pairs, as in the IOI papers)."""
    if metric != "logit_diff_normalized":
        return mean_values
    return (mean_values - base) / (source - base)


def compute(session: ModelSession, spec: PatchingSpec, inputs, progress) -> Result:
    pairs = json.loads(spec.pairs)
    groups = length_groups(pairs)
    n_tokens, n = max(groups), len(pairs)
    # each length runs as its own batch; the mean metric over all pairs is the pair-weighted mean of the groups'
    # means (so one group gives exactly the one-batch result), normalised once with the overall base and
    # source means. Positions align at the end, where the metric is read; a position a shorter pair lacks is
    # unpatched for it (its base metric).
    progress(0.0, "the base and source runs")
    parts = [(len(idx) / n, n_tokens - length, _Group(session, spec, [pairs[i] for i in idx]))
             for length, idx in groups.items()]
    base_m = sum(w * part.base for w, _, part in parts)
    source_m = sum(w * part.source for w, _, part in parts)
    if spec.metric == "logit_diff_normalized" and abs(source_m - base_m) < 1e-6:
        raise WorkbenchError("The clean and corrupted runs give the same logit difference, so it cannot be "
                             "normalised.", hint="Pick the raw logit difference, or other pairs.")
    for g, (length, (_, _, part)) in enumerate(zip(groups, parts)):
        def report(frac, text, g=g, length=length):
            progress((g + frac) / len(groups), text + (f" · pairs of {length} tokens" if len(groups) > 1 else ""))

        part.sweep(report)
    order = [i for idx in groups.values() for i in idx]  # pair indices in the order the groups' columns come
    base_p = torch.cat([part.base_pairs for _, _, part in parts]).double().cpu()  # [N]
    source_p = torch.cat([part.source_pairs for _, _, part in parts]).double().cpu()
    weights = resample_weights(n, seed=0)  # one set of resamples for every node: intervals are comparable
    scale = _Scale(spec.metric, base_p.numpy(), source_p.numpy(), weights)
    rows, per_pair = [], []
    for (method, comp), (_, axes) in parts[0][2].values.items():
        per = torch.cat([_pad_positions(part.values[method, comp][0], axes, shift, part.base_pairs)
                         for _, shift, part in parts], -1).double().cpu()  # [*axes, N]
        flat = per.reshape(-1, n).numpy()
        mean = torch.from_numpy(flat.mean(-1)).reshape(per.shape[:-1])
        df = _tidy(finish(spec.metric, mean, base_m, source_m).float(), axes, method, comp)
        df["ci_low"], df["ci_high"] = bootstrap_interval(flat, weights, scale)
        diffs = flat - base_p.numpy()[None, :]  # [nodes, N] each pair's effect against its unpatched run
        df["p_value"] = sign_flip_p(diffs) if method == "activation" else float("nan")
        df["p_min"] = sign_flip_min_p(diffs) if method == "activation" else float("nan")  # the test's floor
        rows.append(df)
        per_pair.append(_per_pair(df, scale.per_pair(flat), order))
    table = pd.concat(rows, ignore_index=True)
    longest = pairs[groups[n_tokens][0]]
    tokens = tokenize(session, longest["clean_ids"])
    meta = {"n_pairs": n, "n_tokens": n_tokens, "metric": spec.metric,
            "direction": spec.direction, "base_metric": base_m, "source_metric": source_m,
            "clean_metric": base_m if spec.direction == "noise" else source_m,
            "corrupted_metric": source_m if spec.direction == "noise" else base_m}
    if len(groups) > 1:
        meta["length_groups"] = {str(length): len(idx) for length, idx in groups.items()}
        meta["positions"] = (f"{len(groups)} token lengths, run as one batch each; positions are aligned at the "
                             f"final token and labelled with a {n_tokens}-token pair")
    if spec.pairs_note:
        meta["pairs_note"] = spec.pairs_note
    meta["statistics"] = (f"value: the mean over {n} pairs; ci_low/ci_high: 95% bootstrap interval over pairs "
                          f"({N_BOOT} resamples, the normalisation recomputed in each); p_value (activation "
                          "patching): two-sided sign-flip permutation test of the pairs' effects against their own "
                          "unpatched run; p_min: the smallest p that test can give with these pairs (2 / 2^n "
                          "with n pairs, a pair whose effect is exactly 0 not counted)")
    if "activation" in spec.methods:
        meta["p_min"] = float(table["p_min"].min())
        note = unreachable_note(meta["p_min"], n)
        if note:
            meta["p_note"] = note
    extra = {"tokens": tokens, "per_pair": pd.concat(per_pair, ignore_index=True)}
    if "activation" in spec.methods and len(spec.methods) > 1:
        extra["faithfulness"] = faithfulness(table, spec.overlap_k)
    return Result(table=table, meta=meta, extra=extra)


class _Scale:
    """Metric values -> reported values, for bootstrap resamples and single pairs: the normalised logit
    difference divides by the resample's own (source - base) means, so its interval carries that uncertainty."""

    def __init__(self, metric: str, base: np.ndarray, source: np.ndarray, weights: np.ndarray):
        self.metric, self.normalized = metric, metric == "logit_diff_normalized"
        self.base_m, self.source_m = base.mean(), source.mean()
        self.boot_base, self.boot_source = weights @ base, weights @ source  # [n_boot]

    def __call__(self, boot: np.ndarray) -> np.ndarray:  # [rows, n_boot]
        if not self.normalized:
            return boot
        span = self.boot_source - self.boot_base
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.abs(span) > 1e-9, (boot - self.boot_base) / span, np.nan)

    def per_pair(self, flat: np.ndarray) -> np.ndarray:  # [rows, N]: on the reported scale; their mean is it
        return finish(self.metric, flat, self.base_m, self.source_m)


def _per_pair(df: pd.DataFrame, values: np.ndarray, order: list[int]) -> pd.DataFrame:
    """The per-pair table of one (method, component): a row per node and pair (pairs by their index in the
    spec), values on the reported scale."""
    n = len(order)
    out = df.loc[df.index.repeat(n), ["method", "component", "layer", "pos", "head", "dest_pos"]]
    out["pair"] = np.tile(np.asarray(order), len(df))
    out["value"] = values.reshape(-1).astype(np.float32)
    return out.reset_index(drop=True)


def _sweep_cost(comp: str, method: str, spec: PatchingSpec, n_layers: int) -> float:
    """A sweep's rough cost in AtP passes, for its share of the progress bar: activation patching by position
    about 4 (measured on the default model), over heads only about 2; integrated gradients a pass per step and
    layer, in batches of every step."""
    if method == "activation":
        axes = ACTIVATIONS[comp][1]
        return 4.0 if ("pos" in axes or "dest_pos" in axes) else 2.0
    if method == "ig":
        return max(1.0, n_layers * spec.ig_steps / 16)
    return 1.0


def length_groups(pairs: list[dict]) -> dict[int, list[int]]:
    """Pair indices by token length, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(len(p["clean_ids"]), []).append(i)
    return groups


def _pad_positions(values: torch.Tensor, axes: tuple[str, ...], shift: int, fill: torch.Tensor) -> torch.Tensor:
    """`values` [*axes, B] with `shift` positions put in front of every position axis, holding each pair's
    unpatched metric `fill` [B], so that a shorter pair's positions line up at the end with the longest pair's."""
    for dim, axis in enumerate(axes):
        if shift and axis in ("pos", "dest_pos"):
            shape = list(values.shape)
            shape[dim] = shift
            values = torch.cat([fill.to(values).expand(shape), values], dim)
    return values


class _Group:
    """One length group: its base and source runs and metrics (per pair and mean); `sweep` fills `values`, per
    (method, component) the metric of each node for each of the group's pairs [*axes, B], before normalisation,
    with the node axes."""

    def __init__(self, session: ModelSession, spec: PatchingSpec, pairs: list[dict]):
        dev = session.device
        clean = torch.tensor([p["clean_ids"] for p in pairs], device=dev)  # [B, P]
        corrupted = torch.tensor([p["corrupted_ids"] for p in pairs], device=dev)
        answer = torch.tensor([p["answer_id"] for p in pairs], device=dev)
        wrong = torch.tensor([p["wrong_id"] for p in pairs], device=dev)
        self.session, self.spec, self.n = session, spec, len(pairs)
        self.base_tokens, self.source_tokens = (corrupted, clean) if spec.direction == "denoise" else (clean,
                                                                                                       corrupted)
        self.values: dict[tuple[str, str], tuple[torch.Tensor, tuple[str, ...]]] = {}
        with torch.no_grad():
            self.runner = BlockRunner(session.bridge, self.base_tokens)  # records the base run's block inputs
            self.other = BlockRunner(session.bridge, self.source_tokens)
            base_logits, source_logits = self.runner.final_logits, self.other.final_logits  # [B, d_vocab]
            clean_logits = source_logits if spec.direction == "denoise" else base_logits
            self.metric = Metric(spec.metric, answer, wrong, clean_logits.float().log_softmax(-1))
            self.base_pairs = self.metric.raw(base_logits).float()  # [B]
            self.source_pairs = self.metric.raw(source_logits).float()
            self.base, self.source = self.base_pairs.mean().item(), self.source_pairs.mean().item()

    def sweep(self, progress) -> None:
        with torch.no_grad():  # attribution methods switch gradients on for their own pass
            self._sweep(progress)

    def _sweep(self, progress) -> None:
        spec, bridge, metric, runner, other = self.spec, self.session.bridge, self.metric, self.runner, self.other
        base_tokens, source_tokens = self.base_tokens, self.source_tokens
        # each sweep's share of the bar: its rough cost relative to an AtP pass (measured on the default model)
        costs = {(comp, method): _sweep_cost(comp, method, spec, self.session.n_layers)
                 for comp in spec.components for method in spec.methods}
        whole = sum(costs.values())
        start = 0.0
        for comp in spec.components:
            progress(start / whole, f"{comp}: the other run's activations")
            if comp == "resid_pre":
                source = {f"blocks.{layer}.hook_resid_pre": other.inputs[layer] for layer in other.inputs}
            else:
                source = source_activations(bridge, source_tokens, comp)
            for method in spec.methods:
                def report(done, total, start=start, cost=costs[comp, method], comp=comp, method=method):
                    unit = "patches" if method == "activation" else "layers"
                    progress((start + cost * done / total) / whole, f"{method} {comp}" + (
                        f": {int(done)} of {total} {unit}" if total > 1 else ""))

                if method == "activation":
                    sweep = activation_patch_sweep(runner, source, comp, metric, progress=report,
                                                   source_tokens=source_tokens)
                    values, axes = sweep.values.float(), sweep.axes  # [layer, ..., B]
                else:
                    report(0, 1)
                    if method == "ig":
                        scores = integrated_gradients(bridge, base_tokens, source_tokens, [comp],
                                                      lambda logits: metric.raw(logits) / self.n,
                                                      n_steps=spec.ig_steps, progress=report)[comp]
                    else:
                        rules = None if method == "atp" else LRPRules(**{r: r in spec.relp_rules for r in RELP_RULES})
                        with torch.enable_grad():
                            scores = attribution_scores(bridge, base_tokens, source, [comp],
                                                        lambda logits: metric.raw(logits).mean(), rules)[comp]
                    # the first-order estimate of each pair's patched metric (the scores are of the mean over the
                    # group's pairs, so a pair's share is scaled back by B), reported like activation patching
                    values = self.base_pairs.to(scores.device) + self.n * scores.float()  # [layer, ..., B]
                    axes = ("layer",) + ACTIVATIONS[comp][1]
                    report(1, 1)
                self.values[method, comp] = (values, axes)
                start += costs[comp, method]
                self.session.let_others_in()  # between sweeps the model is its own: a waiting run may go first


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


# ----------------------------------------------------------------------------------------------------------
# Memory and work before a run
# ----------------------------------------------------------------------------------------------------------
SHIPPED_TOKENS = 15  # a shipped IOI pair's length (without a model to tokenise them)


def estimate(plan) -> Estimate:
    """Two recorded runs (every block's input for the base and the other run), the other run's activations of
    each component, the widest patched forward (kernels.patching sizes its chunks to a fixed budget) or, for the
    gradient methods, a forward and backward of all pairs.

    Work, per length group of b pairs of n tokens, as kernels.patching runs it: a patch at a position before the
    first one where the two runs differ (fd) changes nothing and is not run; a patch at layer l and position p
    runs blocks l.. over positions p.. only (all-position patches from fd), the unembedding at the last position
    only; patches of one first position share forwards (`waves`) of at most a chunk's rows, each from the lowest
    layer on. Gradient methods: a forward and backward per component (IG: per step)."""
    spec, s = plan.spec, plan.shape
    pairs = json.loads(spec.pairs) if spec.pairs else None
    if pairs:  # a link's pairs may still be text here (the page tokenises them after choosing its settings)
        pairs = [{"clean_ids": pair_ids_or_guess(p), "corrupted_ids": pair_ids_or_guess(p, "corrupted")}
                 for p in pairs]
    lengths = [len(p["clean_ids"]) for p in pairs] if pairs else [SHIPPED_TOKENS] * spec.n_pairs
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    B, P = max(len(g) for g in groups.values()), max(groups)
    recorded = 2 * s.resid_bytes(B, P, s.n_layers + 1)
    sources = sum(s.n_layers * _component_bytes(s, c, B, P) for c in spec.components)
    chunk = 32 * 2**20 if s.device != "cuda" else 0  # kernels.patching.default_chunk_rows' CPU budget
    widest = chunk + s.logits_bytes(B, P, 2)
    grads = 0
    if any(m != "activation" for m in spec.methods):
        steps = spec.ig_steps if "ig" in spec.methods else 1
        grads = s.backward_bytes(B * steps, P) + 2 * sources // max(1, len(spec.components))
    L = s.n_layers
    flops = blocks = 0.0
    for n, idx in groups.items():
        b = len(idx)
        fd = _first_difference([pairs[i] for i in idx]) if pairs else 1  # the shipped pairs differ from a name on
        m = max(1, n - fd)  # positions a patch can change
        cap = max(1, _chunk_rows(s, n) // b)  # patches per forward
        per_token_block = 2.0 * (s.block_params + 2 * n * s.n_heads * s.d_head) + ENTRY_FLOPS * s.block_passes(n)
        flops += 2 * s.forward_flops(b, n)  # the recorded runs
        blocks += s.calls(2)
        for comp in spec.components:
            axes = ACTIVATIONS[comp][1]
            heads = (s.n_kv_heads if comp[0] in "kv" else s.n_heads) if "head" in axes else 1
            by_pos = "pos" in axes or "dest_pos" in axes
            if comp != "resid_pre":  # the other run's activations of the component
                flops += s.forward_flops(b, n)
                blocks += s.calls(1)
            for method in spec.methods:
                if method == "activation":
                    layer_sum = L * (L + 1) / 2  # blocks run by one patch per layer
                    if by_pos:  # patches at (layer, position[, head]), each over positions p.. of blocks l..
                        tokens = b * heads * layer_sum * m * (m + 1) / 2
                        patches, waves = L * heads * m, m * ceil_div(L * heads, cap)
                    else:  # (layer, head): every position from fd
                        tokens = b * heads * layer_sum * m
                        patches, waves = L * heads, ceil_div(L * heads, cap)
                    flops += tokens * per_token_block + patches * b * (2.0 * s.embed_params + s.vocab_flops(1))
                    blocks += waves * (L + 1)
                else:
                    k = spec.ig_steps if method == "ig" else 1
                    flops += k * s.backward_flops(b, n)
                    blocks += k * s.calls(3)
    return Estimate(parts={"recorded runs": recorded, "component activations": sources,
                           "patched forwards": widest, "gradients": grads},
                    flops=flops, blocks=blocks,
                    lower="n_pairs or components (z_by_pos and resid_pre are the largest sweeps)")


def _first_difference(pairs: list[dict]) -> int:
    """The first position where the two runs of some pair differ (kernels.patching skips patches before it)."""
    fd = min(len(p["clean_ids"]) for p in pairs)
    for p in pairs:
        same = 0
        for a, c in zip(p["clean_ids"], p["corrupted_ids"]):
            if a != c:
                break
            same += 1
        fd = min(fd, same)
    return fd


def _chunk_rows(s, n: int) -> int:
    """kernels.patching.default_chunk_rows without a model at hand (a GPU: half its free memory, rows enough)."""
    if s.device == "cuda":
        return 1 << 20
    per_row = 4 * n * (6 * s.d_model + 2 * s.d_mlp + 3 * s.n_heads * n) + 4 * s.d_vocab
    return max(1, 32 * 2**20 // per_row)


def _component_bytes(s, comp: str, B: int, P: int) -> int:
    name = ACTIVATIONS[comp][0]
    if "pattern" in name:
        return 4 * B * s.n_heads * P * P
    if name.endswith(("hook_z", "hook_q")):
        return B * P * s.n_heads * s.d_head * s.itemsize
    if name.endswith(("hook_k", "hook_v")):
        return B * P * s.n_kv_heads * s.d_head * s.itemsize
    return s.resid_bytes(B, P)
