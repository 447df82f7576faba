"""Interventions from a circuit's graph: a chosen set of nodes ablated or patched, and what the model then does.

    spec = CircuitInterventionSpec(nodes=("a9.h9", "a10.h0"), prompts="clean", value="mean")
    outcome = run(spec)   # table: one row per pair (the metric before and after); extra["next_token"]

Nodes are named as on the Circuits page: components `input`, `a{l}.h{h}` (head h's output, z_h W_O[h]), `m{l}` (layer
l's MLP output); features `input`, `f{l}.{i}` (feature i of the SAE after block l), `err{l}` (that SAE's error),
`attn{l}.{i}` / `attnerr{l}` and `mlp{l}.{i}` / `mlperr{l}` (the same at block l's attention or MLP output).
`@p` after a name takes position p alone (every position without it; feature nodes never at position 0, which the
SAEs leave whole, as its error node).

The chosen prompts (each pair's clean or corrupted prompt) run with every chosen node at once set to `value`: its
value in the pair's other prompt (patching), its mean over the chosen prompts position by position (mean ablation)
or zero; everything after a chosen node is recomputed, and a node downstream of another chosen one takes its value
with the upstream ones already set (patching a feature node leaves the SAE's other features and its error as the
intervened run computes them). Reported per pair: the metric of the clean, the corrupted, the chosen prompts' own
run and the intervened run, their KL divergence at the final position, and the next-token distribution before and
after (`extra["next_token"]`: the union of both runs' top `top_k` tokens).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ...errors import WorkbenchError
from ...estimate import Estimate
from ...models import ModelHandle
from ...result import Result
from ...session import ModelSession
from ...specs import Spec, param
from ...stats import resample_weights
from ..patching.compute import Metric, length_groups
from ..patching.spec import METRICS, PromptPairs, resolve_pairs
from .common import SHIPPED, mean_effects
from .spec import (
    FEATURE_NODE,
    LEVELS,
    SITE_OF_PREFIX,
    SAEFields,
    folders_by_site,
    sae_input,
    sae_spec_at,
    site_name,
    site_order,
)

NODE = re.compile(r"^(?:(?P<input>input)|a(?P<al>\d+)\.h(?P<head>\d+)|m(?P<ml>\d+)|" + FEATURE_NODE + r")"
                  r"(?:@(?P<pos>\d+))?$")
KINDS = {"components": ("input", "head", "mlp"), "features": ("input", "feature", "error")}
VALUES = {"other": "its value in the pair's other prompt (patching)",
          "mean": "its mean over the chosen prompts, position by position (mean ablation)",
          "zero": "zero (zero ablation)"}
MAX_NODES = 4096


@dataclass(frozen=True)
class Node:
    kind: str  # input, head, mlp, feature, error
    layer: int  # -1 for the input
    index: int  # the head or feature; -1 where there is none
    pos: int | None  # None: every position
    site: str = "resid_post"  # a feature's or error node's SAE site: resid_post, attn_out or mlp_out

    @property
    def hook(self) -> str:
        if self.kind == "input":
            return "blocks.0.hook_resid_pre"
        if self.kind == "head":
            return f"blocks.{self.layer}.attn.hook_z"
        if self.kind == "mlp":
            return f"blocks.{self.layer}.hook_mlp_out"
        return f"blocks.{self.layer}.hook_{self.site}"


def parse_node(name: str) -> Node:
    m = NODE.match(name.strip())
    if m is None:
        raise WorkbenchError(f"{name!r} is not a node name.",
                             hint="Name nodes as the graph does: input, a3.h2, m5 (components) or f4.117, err4, "
                                  "attn4.9, mlperr4 (features), optionally at one position: a3.h2@7, f4.117@12.")
    g = m.groupdict()
    pos = int(g["pos"]) if g["pos"] is not None else None
    if g["input"]:
        return Node("input", -1, -1, pos)
    if g["al"] is not None:
        return Node("head", int(g["al"]), int(g["head"]), pos)
    if g["ml"] is not None:
        return Node("mlp", int(g["ml"]), -1, pos)
    if g["fl"] is not None:
        return Node("feature", int(g["fl"]), int(g["feature"]), pos, SITE_OF_PREFIX[g["fs"]])
    return Node("error", int(g["el"]), -1, pos, SITE_OF_PREFIX[g["es"]])


def sae_sites(spec) -> list[tuple[str, int]]:
    """The SAE sites the chosen feature and error nodes sit at (each needs that site's SAE), in model order."""
    if spec.level != "features":
        return []
    return sorted({(n.site, n.layer) for n in map(parse_node, spec.nodes) if n.kind in ("feature", "error")},
                  key=site_order)


@dataclass(frozen=True)
class CircuitInterventionSpec(PromptPairs, SAEFields, Spec):
    """Prompt pairs (as the Circuits page's) run with a set of graph nodes ablated or patched."""

    analysis: ClassVar[str] = "circuit_intervention"
    key_legacy: ClassVar[dict] = {**Spec.key_legacy, **SAEFields.LEGACY}
    title: ClassVar[str] = "Interventions on circuit nodes: the metric and the next-token distribution before and after"
    level: str = param("components", "components: nodes are the input, heads and MLPs; features: the input, SAE "
                       "features and SAE error nodes", choices=LEVELS)
    nodes: tuple[str, ...] = param(("a0.h0",), "the nodes set, all at once (input, a{l}.h{h}, m{l}; f{l}.{i}, "
                                   "err{l}, attn{l}.{i}, attnerr{l}, mlp{l}.{i}, mlperr{l}; @p for one position)",
                                   max_len=MAX_NODES)
    prompts: str = param("clean", "which prompt of each pair runs with the nodes set", choices=("clean", "corrupted"))
    value: str = param("other", "what each chosen node is set to: " + "; ".join(f"{k}: {v}" for k, v in VALUES.items()),
                       choices=tuple(VALUES))
    metric: str = param("logit_diff_normalized", "metric at the final position", choices=METRICS)
    top_k: int = param(10, "next tokens shown per run (the union of both runs' top k)", min=1, max=100)

    def validate(self) -> None:
        if not self.nodes:
            raise WorkbenchError("Pick at least one node to set.")
        self.validate_pairs()
        kinds = KINDS[self.level]
        for name in self.nodes:
            node = parse_node(name)
            if node.kind not in kinds:
                other = "features" if self.level == "components" else "components"
                raise WorkbenchError(f"{name!r} is a node of the {other} graph, and these nodes are "
                                     f"{self.level}.", hint=f"Pick the {other} level, or nodes of this one.")

    def resolve(self, handle: ModelHandle) -> "CircuitInterventionSpec":
        spec = resolve_pairs(self.replace(nodes=tuple(sorted(set(n.strip() for n in self.nodes)))), handle)
        spec, widths = (spec.resolve_folders(handle) if self.level == "features"
                        else (spec.replace(sae_folders=(), sae_hashes=()), {}))  # no SAEs at the component level
        s = handle.summary
        lengths = sorted({len(p["clean_ids"]) for p in json.loads(spec.pairs)})
        nodes = [parse_node(n) for n in spec.nodes]
        positioned = any(n.pos is not None for n in nodes)
        if positioned and len(lengths) > 1:
            raise WorkbenchError(f"A node at one position (@p) needs pairs of one token length; these have "
                                 f"{len(lengths)} ({', '.join(map(str, lengths))}).",
                                 hint="Drop the @p, or give pairs of one length.")
        for name, n in zip(spec.nodes, nodes):
            where = f"{name!r}:"
            if n.layer >= s.n_layers:
                raise WorkbenchError(f"{where} {handle.name} has blocks 0 to {s.n_layers - 1}.")
            if n.kind == "head" and n.index >= s.n_heads:
                raise WorkbenchError(f"{where} {handle.name} has heads 0 to {s.n_heads - 1} in each layer.")
            if widths and n.kind in ("feature", "error") and (n.site, n.layer) not in widths:
                raise WorkbenchError(f"{where} none of the SAE folders holds the SAE of {site_name((n.site, n.layer))} "
                                     f"(they hold {', '.join(site_name(x) for x in widths)}).",
                                     hint="Add that site's folder, or pick other nodes.")
            width = widths.get((n.site, n.layer), spec.sae_width)
            if n.kind == "feature" and n.index >= width:
                raise WorkbenchError(f"{where} the SAE there has features 0 to {width - 1}"
                                     f"{'' if widths else ' (sae_width)'}.")
            if n.pos is not None and n.pos >= lengths[0]:
                raise WorkbenchError(f"{where} the prompts have positions 0 to {lengths[0] - 1}.")
            if n.kind == "feature" and n.pos == 0:
                err = {"resid_post": "err", "attn_out": "attnerr", "mlp_out": "mlperr"}[n.site]
                raise WorkbenchError(f"{where} position 0 is not split into features (the SAEs leave it whole); "
                                     f"its error node {err}{n.layer}@0 is the whole value there.")
        missing = sorted({n.hook for n in nodes} - set(handle.bridge.hook_dict))
        if missing:
            raise WorkbenchError(f"{handle.name} has no hook {missing[0]}: its blocks lack what these nodes name.",
                                 hint="Use nodes this model's Circuits graph shows.")
        return spec


def sae_inputs(spec, got) -> dict | None:
    """The Features page's SAE at each site a chosen feature or error node sits at (the circuit's SAEs)."""
    folders = folders_by_site(spec)
    return {sae_input(site): sae_spec_at(spec, site[1], folders, site[0]) for site in sae_sites(spec)} or None


# ----------------------------------------------------------------------------------------------------------
# Compute
# ----------------------------------------------------------------------------------------------------------
class _Targets:
    """The values the chosen nodes are set to, by hook: recorded from the runs that are not intervened."""

    def __init__(self, nodes: list[Node], saes: dict, value: str, base: dict, other: dict, skip_first: bool):
        self.nodes, self.saes, self.value, self.skip_first = nodes, saes, value, skip_first
        self.by_hook: dict[str, list[Node]] = {}
        for n in nodes:
            self.by_hook.setdefault(n.hook, []).append(n)
        self.target: dict[str, object] = {}
        for hook, group in self.by_hook.items():
            src = other[hook] if value == "other" else base[hook]
            split = self._split(group[0], src)
            parts = split if isinstance(split, tuple) else (split,)
            if value == "mean":
                parts = tuple(t.mean(0, keepdim=True).expand_as(t) for t in parts)
            elif value == "zero":
                parts = tuple(torch.zeros_like(t) for t in parts)
            self.target[hook] = parts if isinstance(split, tuple) else parts[0]

    def _split(self, node: Node, resid: torch.Tensor):
        if node.kind not in ("feature", "error"):
            return resid
        sae = self.saes[(node.site, node.layer)]
        acts = sae.encode(resid.float())
        if self.skip_first:
            acts = torch.cat([torch.zeros_like(acts[:, :1]), acts[:, 1:]], 1)
        return acts, resid.float() - sae.decode(acts)

    def hooks(self) -> list:
        out = []
        for hook_name, group in self.by_hook.items():
            out.append((hook_name, self._hook(group, self.target[hook_name])))
        return out

    def _hook(self, group: list[Node], target):
        def at(n: Node):
            return slice(None) if n.pos is None else slice(n.pos, n.pos + 1)

        def hook(t, hook):
            if group[0].kind in ("feature", "error"):
                acts, err = self._split(group[0], t)
                for n in group:
                    if n.kind == "feature":
                        p = slice(1 if self.skip_first else 0, None) if n.pos is None else at(n)
                        acts[:, p, n.index] = target[0][:, p, n.index]
                    else:
                        err[:, at(n)] = target[1][:, at(n)]
                return (self.saes[(group[0].site, group[0].layer)].decode(acts) + err).to(t.dtype)
            t = t.clone()
            for n in group:
                if n.kind == "head":
                    t[:, at(n), n.index] = target[:, at(n), n.index].to(t.dtype)
                else:
                    t[:, at(n)] = target[:, at(n)].to(t.dtype)
            return t
        return hook


def compute_intervention(session: ModelSession, spec: CircuitInterventionSpec, inputs, progress) -> Result:
    from ..features.sae import SKIP_FIRST, sae_from_result

    pairs = json.loads(spec.pairs)
    nodes = [parse_node(n) for n in spec.nodes]
    saes = {}
    for site in sae_sites(spec):
        sae, _ = sae_from_result(inputs[sae_input(site)].result)
        saes[site] = sae.to(session.device).requires_grad_(False)
    hooks = sorted({n.hook for n in nodes})
    n = len(pairs)
    next_rows = []
    per = {k: np.zeros(n) for k in ("clean", "corrupted", "base", "intervened", "kl")}
    groups = length_groups(pairs)
    for gi, idx in enumerate(groups.values()):
        length = len(pairs[idx[0]]["clean_ids"])
        progress(gi / len(groups), f"pairs of {length} tokens: the runs and the intervened run")
        group = [pairs[i] for i in idx]
        dev = session.device
        clean = torch.tensor([p["clean_ids"] for p in group], device=dev)
        corrupted = torch.tensor([p["corrupted_ids"] for p in group], device=dev)
        answer = torch.tensor([p["answer_id"] for p in group], device=dev)
        wrong = torch.tensor([p["wrong_id"] for p in group], device=dev)
        with torch.no_grad():
            l_clean, c_clean = session.run_with_cache(clean, hooks)
            l_corr, c_corr = session.run_with_cache(corrupted, hooks)
            l_clean, l_corr = l_clean[:, -1].float(), l_corr[:, -1].float()
            metric = Metric(spec.metric, answer, wrong, l_clean.log_softmax(-1))
            base_tokens, base_cache, other_cache, l_base = (clean, c_clean, c_corr, l_clean) \
                if spec.prompts == "clean" else (corrupted, c_corr, c_clean, l_corr)
            targets = _Targets(nodes, saes, spec.value, {h: base_cache[h] for h in hooks},
                               {h: other_cache[h] for h in hooks}, SKIP_FIRST)
            l_int = session.run_with_hooks(base_tokens, fwd_hooks=targets.hooks())[:, -1].float()
        lp_base, lp_int = l_base.log_softmax(-1), l_int.log_softmax(-1)
        lp_other = (l_corr if spec.prompts == "clean" else l_clean).log_softmax(-1)
        kl = (lp_base.exp() * (lp_base - lp_int)).sum(-1)
        for name, v in (("clean", metric.raw(l_clean)), ("corrupted", metric.raw(l_corr)),
                        ("base", metric.raw(l_base)), ("intervened", metric.raw(l_int)), ("kl", kl)):
            per[name][idx] = v.double().cpu().numpy()
        k = min(spec.top_k, lp_base.shape[-1])
        for row, i in enumerate(idx):
            top = torch.cat([lp_base[row].topk(k).indices, lp_int[row].topk(k).indices,
                             torch.stack([answer[row], wrong[row]])]).unique().tolist()
            for t in top:
                next_rows.append({"pair": i, "token_id": int(t), "p_before": float(lp_base[row, t].exp()),
                                  "p_after": float(lp_int[row, t].exp()), "p_other": float(lp_other[row, t].exp()),
                                  "answer": t == pairs[i]["answer_id"], "wrong": t == pairs[i]["wrong_id"]})
    progress(1.0, "the tables")
    nt = pd.DataFrame(next_rows)
    names = session.tokenizer.batch_decode([[t] for t in nt["token_id"]]) if len(nt) else []
    nt.insert(2, "token", names)
    nt = nt.sort_values(["pair", "p_before"], ascending=[True, False]).reset_index(drop=True)
    prompts = session.tokenizer.batch_decode([p[f"{spec.prompts}_ids"] for p in pairs])
    table = pd.DataFrame({"pair": np.arange(n), "prompt": prompts,
                          "clean": per["clean"], "corrupted": per["corrupted"], "before": per["base"],
                          "after": per["intervened"], "change": per["intervened"] - per["base"],
                          "kl": per["kl"]})
    weights = resample_weights(n, seed=0)
    change, c_lo, c_hi = mean_effects(per["intervened"][None], per["base"], per["base"], False, weights)
    meta = {"n_pairs": n, "metric": spec.metric, "nodes": list(spec.nodes), "prompts": spec.prompts,
            "value": spec.value, "clean_metric": float(per["clean"].mean()),
            "corrupted_metric": float(per["corrupted"].mean()), "before": float(per["base"].mean()),
            "after": float(per["intervened"].mean()), "change": float(change[0]), "change_low": float(c_lo[0]),
            "change_high": float(c_hi[0]), "kl": float(per["kl"].mean()), "pairs_note": spec.pairs_note,
            "statistics": f"means over {n} pairs; the change's 95% interval is a bootstrap over pairs"}
    if spec.metric.startswith("logit_diff") and abs(per["clean"].mean() - per["corrupted"].mean()) > 1e-6:
        # where the intervened run lies between the corrupted (0) and the clean (1) run, means over pairs
        for key, vals in (("before", per["base"]), ("after", per["intervened"])):
            v, lo, hi = mean_effects(vals[None], per["corrupted"], per["clean"], True, weights)
            meta[f"{key}_normalized"], meta[f"{key}_normalized_low"], meta[f"{key}_normalized_high"] = \
                float(v[0]), float(lo[0]), float(hi[0])
    return Result(table=table, meta=meta, extra={"next_token": nt})


def estimate_intervention(plan) -> Estimate:
    """Memory: the three runs' hooked tensors and final logits; work: three forwards per pair (the clean, the
    corrupted and the intervened run) and each chosen SAE's encode and decode in each. The SAEs not stored yet
    are upstream runs."""
    from ...estimate import Plan, input_estimate
    from ..features.sae import estimate as sae_estimate

    spec, s = plan.spec, plan.shape
    pairs = json.loads(spec.pairs) if spec.pairs else None
    B = len(pairs) if pairs else spec.n_pairs
    P = max((len(p.get("clean_ids", [])) for p in pairs), default=SHIPPED) if pairs else SHIPPED
    P = P or SHIPPED
    layers = sae_sites(spec)
    hooks = len({parse_node(n).hook for n in spec.nodes})
    held = 3 * hooks * B * P * max(s.d_model, spec.sae_width if layers else 0) * 4
    sae_pass = 2.0 * 2 * P * s.d_model * spec.sae_width
    upstream = []
    for name, sub in (sae_inputs(spec, {}) or {}).items():
        est = input_estimate(sae_estimate, Plan(s, sub, plan.handle, plan.dataset, plan.get_stored))
        est.input = name
        upstream.append(est)
    return Estimate(parts={"runs": held + 3 * s.forward_bytes(B, P)},
                    flops=3 * s.forward_flops(B, P) + 3 * len(layers) * B * sae_pass, blocks=s.calls(3),
                    lower="n_pairs", upstream=upstream)
