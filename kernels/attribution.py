"""Attribution patching (AtP) and relevance patching (RelP): every node of a component type from 2 forwards and
1 backward.

    score(n) = sum over features of (a_source(n) - a_base(n)) * dM/da(n)        gradient taken on the base run

AtP uses the plain gradient. RelP replaces local gradients by LRP propagation coefficients, set with
"detach tricks" in forward hooks so that forward values are unchanged (each rule returns
`value.detach() + (expr - expr.detach())`: the value of the original, the gradient of expr):

    LN rule        LayerNorm / RMSNorm (every block norm and the final norm): the scale is a constant
    identity rule  elementwise activations: act(x) -> x * (act(x) / x).detach()
    half rule      the product of a gated MLP act(g) * u: each factor f -> f/2 + (f/2).detach()
    AH rule        (optional) attention softmax: the pattern is a constant, so no gradient reaches q or k;
                   q, k and pattern scores are then unavailable (NaN), not zero

The rules are chosen per call, never fixed when the model loads.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .grad import frozen
from .patching import ACTIVATIONS, axis_sizes, hook_name, hook_point


@dataclass(frozen=True)
class LRPRules:
    ln: bool = True
    identity: bool = True
    half: bool = True
    attention: bool = False  # the AH rule

    @staticmethod
    def none() -> "LRPRules":
        return LRPRules(ln=False, identity=False, half=False, attention=False)


def _keep_value(value: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
    """The forward value of `value`, the gradient of `expr`."""
    return value.detach() + (expr - expr.detach())


def _stabilise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return torch.where(x >= 0, x.clamp(min=eps), x.clamp(max=-eps))


def lrp_hooks(bridge, rules: LRPRules) -> list[tuple[str, Callable]]:
    """Forward hooks that implement the chosen rules on this bridge."""
    hooks: list[tuple[str, Callable]] = []
    n_layers = bridge.cfg.n_layers
    names = set(bridge.hook_dict)
    gated = bool(getattr(bridge.cfg, "gated_mlp", False))
    from transformers.activations import ACT2FN

    act_fn = ACT2FN[str(getattr(bridge.cfg, "act_fn", "gelu_new"))]

    if rules.ln:
        def const_scale(scale, hook):
            return scale.detach()

        for layer in range(n_layers):
            for ln in ("ln1", "ln2", "norm"):  # norm: a one-part block's own (Mamba's)
                name = f"blocks.{layer}.{ln}.hook_scale"
                if name in names:
                    hooks.append((name, const_scale))
        if "ln_final.hook_scale" in names:
            hooks.append(("ln_final.hook_scale", const_scale))

    if rules.identity or (gated and rules.half):
        for layer in range(n_layers):
            saved: dict[str, torch.Tensor] = {}
            pre, post = f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"
            lin = f"blocks.{layer}.mlp.hook_pre_linear"
            if pre not in names or post not in names:  # a block without an MLP (Mamba's)
                continue

            def save(name):
                def hook(act, hook, name=name, saved=saved):
                    saved[name] = act
                    return act
                return hook

            def rule(act, hook, saved=saved):
                g = saved.pop("pre")
                a_val = act_fn(g.detach())  # act(g), exactly as the model computed it
                if rules.identity:
                    a = g * (a_val / _stabilise(g.detach())).detach()
                else:
                    a = act_fn(g)
                if not gated:
                    return _keep_value(act, a)
                u = saved.pop("lin")
                expr = (a / 2 + (a / 2).detach()) * (u / 2 + (u / 2).detach()) if rules.half else a * u
                return _keep_value(act, expr)

            hooks += [(pre, save("pre")), (post, rule)]
            if gated:
                hooks.append((lin, save("lin")))

    if rules.attention:
        def const_pattern(pattern, hook):
            return pattern.detach()

        hooks += [(f"blocks.{layer}.attn.hook_pattern", const_pattern) for layer in range(n_layers)
                  if f"blocks.{layer}.attn.hook_pattern" in names]  # not in a convolution or state-space block
    return hooks


def _reduce(product: torch.Tensor, activation: str) -> torch.Tensor:
    """Sum an elementwise (delta * grad) [B, ...] over the features each node of `activation` owns."""
    kind = ACTIVATIONS[activation][1]
    if activation.startswith("pattern"):  # [B, H, q, k]
        return product.sum((2, 3)) if kind == ("head",) else product.sum(3)  # [B, H] or [B, H, q]
    if kind == ("pos",):  # [B, P, d]
        return product.sum(-1)
    if kind == ("head",):  # [B, P, H, dh]
        return product.sum((1, 3))
    return product.sum(-1)  # [B, P, H]


def attribution_scores(
    bridge,
    base_tokens: torch.Tensor,
    source: dict[str, torch.Tensor],
    activations: Sequence[str],
    metric: Callable[[torch.Tensor], torch.Tensor],
    rules: LRPRules | None = None,
) -> dict[str, torch.Tensor]:
    """AtP (rules=None) or RelP scores for every node of each activation type: {activation: [layer, ..., B]}.

    `source` holds the other run's activations for every hook of the requested types; `metric` maps the base
    run's final-position logits [B, d_vocab] to a scalar (e.g. the mean logit difference)."""
    n_layers = bridge.cfg.n_layers
    rules = rules or LRPRules.none()
    wanted = {hook_point(a, layer) for a in activations for layer in range(n_layers)}
    if "resid_mid" in activations:  # its base value is resid_pre + attn_out
        wanted |= {hook_point("resid_pre", layer) for layer in range(n_layers)}
    saved: dict[str, torch.Tensor] = {}

    def keeper(name: str):  # hook.name is the canonical name, not the alias we asked for
        def keep(act, hook):
            if act.requires_grad:
                act.retain_grad()
            saved[name] = act
            return act
        return keep

    def grad_from_here(act, hook):  # weights stay frozen: the graph starts at the first block's input
        return act.detach().requires_grad_(True)

    # the LRP hooks go first so that saved activations are the ones downstream computation uses
    hooks = [("blocks.0.hook_resid_pre", grad_from_here)] + lrp_hooks(bridge, rules) + [
        (name, keeper(name)) for name in sorted(wanted)]
    with frozen(bridge), torch.enable_grad(), bridge.hooks(fwd_hooks=hooks), warnings.catch_warnings():
        # the LN rule edits hook_scale on purpose; the bridge warns that RMSNorm then rounds differently
        warnings.filterwarnings("ignore", message=".*edited hook_scale/hook_normalized.*")
        logits = bridge(base_tokens, return_type="logits")[:, -1]
        value = metric(logits)
        value.backward()
    out = {}
    for a in activations:
        per_layer = []
        for layer in range(n_layers):
            name = hook_name(a, layer)
            act = saved.get(hook_point(a, layer))
            if act is None or act.grad is None:  # e.g. q/k/pattern under the AH rule: no gradient reaches them
                shape = _reduce(source[name], a).shape
                per_layer.append(torch.full(shape, float("nan"), device=base_tokens.device))
                continue
            base_value = act.detach()
            if a == "resid_mid":  # the gradient at attn_out is the gradient at resid_mid = resid_pre + attn_out
                base_value = saved[hook_point("resid_pre", layer)].detach() + base_value
            per_layer.append(_reduce((source[name] - base_value) * act.grad, a).detach())
        stacked = torch.stack(per_layer)  # [layer, B, ...]
        out[a] = stacked.movedim(1, -1)  # [layer, ..., B]
    return out


def integrated_gradients(
    bridge,
    base_tokens: torch.Tensor,
    source_tokens: torch.Tensor,
    activations: Sequence[str],
    metric_rows: Callable[[torch.Tensor], torch.Tensor],
    n_steps: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Layer integrated gradients (Captum) on the same hook points: {activation: [layer, ..., B]}.
    `progress(done, total)` hears of each layer done (of every activation's layers).

    For each hook, the activation moves on a straight line from the source run's value to the base run's while
    everything else is the base run's; the attribution is (a_source - a_base) times the mean gradient along it,
    in the sign convention of `attribution_scores`. `metric_rows` maps final-position logits [rows, d_vocab],
    rows laid out (step, prompt), to [rows]."""
    from captum.attr import LayerIntegratedGradients

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        return metric_rows(bridge(tokens, return_type="logits")[:, -1])

    out: dict[str, torch.Tensor] = {}
    L = bridge.cfg.n_layers
    with frozen(bridge):
        for ai, a in enumerate(activations):
            if a == "resid_mid":
                out[a] = _resid_mid_ig(bridge, base_tokens, source_tokens, metric_rows, n_steps,
                                       None if progress is None else
                                       (lambda done, _, ai=ai: progress(ai * L + done, len(activations) * L)))
                continue
            per_layer = []
            for layer in range(L):
                if progress is not None:
                    progress(ai * L + layer, len(activations) * L)
                module = bridge.hook_dict[hook_name(a, layer)]
                lig = LayerIntegratedGradients(forward, module)
                with torch.enable_grad():
                    attr = lig.attribute(inputs=base_tokens, baselines=source_tokens, n_steps=n_steps,
                                         internal_batch_size=base_tokens.shape[0] * n_steps)
                attr = -attr.detach()  # Captum integrates source -> base; flip the sign
                if not a.startswith(("resid", "attn_out", "mlp_out", "pattern")) and attr.dim() == 3:
                    heads = axis_sizes(bridge, a, attr.shape[1])["head"]  # the hook saw [B, P, heads * d_head]
                    attr = attr.view(*attr.shape[:2], heads, -1)
                per_layer.append(_reduce(attr, a))
            out[a] = torch.stack(per_layer).movedim(1, -1)
    return out


def _resid_mid_ig(bridge, base_tokens, source_tokens, metric_rows, n_steps, progress=None) -> torch.Tensor:
    """Integrated gradients at resid_mid: the residual between attention and MLP moves on a straight line from
    the source run's value to the base run's (set through attn_out = resid_mid - resid_pre, as the patches are);
    Captum's IntegratedGradients over that one activation. [layer, pos, B]"""
    from captum.attr import IntegratedGradients

    from .patching import source_activations

    B = base_tokens.shape[0]
    with torch.no_grad():
        pre = source_activations(bridge, base_tokens, "resid_pre")
        attn = source_activations(bridge, base_tokens, "attn_out")
        src_mid = source_activations(bridge, source_tokens, "resid_mid")
    per_layer = []
    for layer in range(bridge.cfg.n_layers):
        if progress is not None:
            progress(layer, bridge.cfg.n_layers)
        point = hook_point("resid_mid", layer)
        base_attn = attn[hook_name("attn_out", layer)]
        target_attn = src_mid[hook_name("resid_mid", layer)] - pre[hook_name("resid_pre", layer)]

        def forward(attn_values: torch.Tensor, point=point) -> torch.Tensor:
            k = attn_values.shape[0] // B
            with bridge.hooks(fwd_hooks=[(point, lambda act, hook: attn_values)]):
                return metric_rows(bridge(base_tokens.repeat(k, 1), return_type="logits")[:, -1])

        with torch.enable_grad():
            attr = IntegratedGradients(forward).attribute(base_attn, baselines=target_attn, n_steps=n_steps,
                                                          internal_batch_size=B * n_steps)
        per_layer.append(-attr.detach().sum(-1))  # Captum integrates source -> base; flip the sign. [B, P]
    return torch.stack(per_layer).movedim(1, -1)
