"""The logit lens (and the tuned lens beside it): every layer's residual decoded as a next-token distribution.

For each site (resid_pre, resid_mid, resid_post) of every layer and every position: the final norm is recomputed
on that residual (not the final layer's cached scale, which flattens early layers), then the unembedding with its
bias and the model's own output transform (Gemma 2's final soft-cap; `kernels.readout`). Reported per cell:
entropy, KL from the model's final distribution, the top-k tokens, and the probability and rank of the model's own
final prediction at that position and of any target tokens the user names. The statistics run through
`kernels.lens`, which never holds a layers x positions x vocab tensor.

    spec = LensSpec(prompt="The capital of France is", targets=(" Paris",))
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from kernels.lens import lens_stats
from kernels.patching import is_parallel
from kernels.readout import output_transform

from ...errors import WorkbenchError
from ...estimate import Estimate
from ...result import Result
from ...session import ModelSession
from ...stats import N_BOOT, mean_ci
from ...tokens import token_strings, tokenize
from ..tuned_lens.compute import Translators, translate
from .spec import LensSpec


def residual_rows(session: ModelSession, ids: list[int], sites: tuple[str, ...]):
    """Residuals [rows, d] for every (site, layer), the final residual [P, d] and the model's logits [P, V].

    resid_mid is the stream between a block's two parts: resid_pre + attn_out where the block has an attention
    output, else (a convolution block then an MLP, LFM2's) the residual entering its MLP. A block with one part
    (Mamba's) or whose attention and MLP run in parallel has none, and it is left out for that layer."""
    bridge = session.bridge
    L = session.n_layers
    pre = [session.hook("resid_pre", layer) for layer in range(L)]
    names = {*pre, session.hook("resid_post", L - 1)}
    mid: dict[int, list[str]] = {}  # layer -> the hooks whose sum is its resid_mid
    if "resid_mid" in sites and not is_parallel(bridge):
        for layer in range(L):
            attn, own = session.hook("attn_out", layer), session.hook("resid_mid", layer)
            if attn in bridge.hook_dict:
                mid[layer] = [pre[layer], attn]
            elif own in bridge.hook_dict and session.hook("mlp_out", layer) in bridge.hook_dict:
                mid[layer] = [own]
        names |= {n for hooks in mid.values() for n in hooks}
    with torch.no_grad():
        logits, cache = session.run_with_cache(session.tensor(ids), names)
    final = cache[session.hook("resid_post", L - 1)][0]
    keys, rows = [], []
    for site in sites:
        for layer in range(L):
            if site == "resid_pre":
                h = cache[pre[layer]][0]
            elif site == "resid_mid":
                if layer not in mid:
                    continue
                h = sum(cache[n][0] for n in mid[layer])
            else:
                h = cache[pre[layer + 1]][0] if layer + 1 < L else final
            keys.append((site, layer))
            rows.append(h)
    h = torch.cat(rows) if rows else final[:0]  # no rows: only resid_mid asked of a model that has none
    return keys, h, final, logits[0]


def _lens_tables(session: ModelSession, spec, keys, x, ref, model_top, lens_name):
    """Statistics and tidy tables for normalised rows x [len(keys) * P, d] of one lens."""
    bridge = session.bridge
    P = ref.shape[0]
    n_rows = len(keys)
    pos = torch.arange(P, device=x.device).repeat(n_rows)
    targets = torch.cat([model_top[:, None], torch.tensor(spec.target_ids, dtype=torch.long,
                                                           device=model_top.device).expand(P, -1)], 1)
    with torch.no_grad():
        st = lens_stats(x, bridge.W_U, bridge.b_U, ref=ref, ref_index=pos, targets=targets.repeat(n_rows, 1),
                        k=spec.top_k, transform=output_transform(bridge))
    site_col = [s for s, _ in keys for _ in range(P)]
    layer_col = [layer for _, layer in keys for _ in range(P)]
    pos_col = list(range(P)) * n_rows
    tok = token_strings(session, list(spec.token_ids))
    top_ids, top_p = st.top_ids.cpu(), st.top_logprob.exp().cpu()
    t_p, t_rank = st.target_logprob.exp().cpu(), st.target_rank.cpu()
    seen = sorted(set(top_ids.reshape(-1).tolist()) | set(model_top.tolist()) | set(spec.target_ids))
    names = dict(zip(seen, token_strings(session, seen)))
    table = pd.DataFrame({
        "lens": lens_name, "site": site_col, "layer": layer_col, "pos": pos_col, "token": [tok[p] for p in pos_col],
        "entropy": st.entropy.cpu().numpy(), "kl_to_final": st.kl.cpu().clamp(min=0).numpy(),
        "top_token": [names[i] for i in top_ids[:, 0].tolist()], "top_prob": top_p[:, 0].numpy(),
        "final_token": [names[i] for i in model_top.tolist()] * n_rows,
        "final_prob": t_p[:, 0].numpy(), "final_rank": t_rank[:, 0].numpy()})
    k = top_ids.shape[1]
    top = pd.DataFrame({
        "lens": lens_name, "site": [s for s in site_col for _ in range(k)],
        "layer": [v for v in layer_col for _ in range(k)], "pos": [v for v in pos_col for _ in range(k)],
        "rank": list(range(k)) * len(site_col), "token_id": top_ids.reshape(-1).numpy(),
        "token": [names[i] for i in top_ids.reshape(-1).tolist()], "prob": top_p.reshape(-1).numpy()})
    targets_t = None
    if spec.target_ids:
        T = len(spec.target_ids)
        targets_t = pd.DataFrame({
            "lens": lens_name, "site": [s for s in site_col for _ in range(T)],
            "layer": [v for v in layer_col for _ in range(T)], "pos": [v for v in pos_col for _ in range(T)],
            "target": [names[t] for t in spec.target_ids] * len(site_col),
            "target_id": list(spec.target_ids) * len(site_col),
            "prob": t_p[:, 1:].reshape(-1).numpy(), "rank": t_rank[:, 1:].reshape(-1).numpy()})
    return table, top, targets_t


def compute(session: ModelSession, spec: LensSpec, inputs, progress) -> Result:
    ids = list(spec.token_ids)
    bridge = session.bridge
    progress(0.1, "residuals")
    keys, h, final, logits = residual_rows(session, ids, spec.sites)
    P = len(ids)
    if not keys:
        why = ("runs attention and MLP in parallel" if is_parallel(bridge) else
               f"is a {getattr(bridge.original_model.config, 'model_type', type(bridge.original_model).__name__)} "
               "whose blocks have one part each")
        raise WorkbenchError(f"{session.name} {why}, so it has no resid_mid.", hint="Pick resid_pre or resid_post.")
    with torch.no_grad():
        ref = bridge.ln_final(final)
    model_top = logits.float().argmax(-1)  # [P]: the model's own prediction at each position
    tables, tops, targets, extra_meta = [], [], [], {}
    for lens_name in spec.lenses:
        progress(0.3, f"{lens_name} lens")
        lens_keys, rows = keys, h
        if lens_name == "tuned":
            trained = inputs["tuned_lens"]  # the stored translators (declared in the entry)
            extra_meta["tuned_lens_run"] = trained.key
            translators = Translators.from_frame(trained.result.extra["translators"]).to(h.device)
            with torch.no_grad():
                moved, ok = translate(translators, keys, h, P, bridge.cfg.n_layers)
            keep = [i for i, good in enumerate(ok) if good]
            if not keep:
                continue
            lens_keys = [keys[i] for i in keep]
            rows = torch.cat([moved[i * P:(i + 1) * P] for i in keep])
        with torch.no_grad():
            x = bridge.ln_final(rows)  # the final norm recomputed on each residual
        t, tp, tg = _lens_tables(session, spec, lens_keys, x, ref, model_top, lens_name)
        tables.append(t)
        tops.append(tp)
        if tg is not None:
            targets.append(tg)
    progress(0.9, "tables")
    table = pd.concat(tables, ignore_index=True)
    first = 1 if spec.bos == "yes" and P > 1 else 0  # the BOS position predicts nothing of the text
    extra = {"tokens": tokenize(session, ids), "top": pd.concat(tops, ignore_index=True),
             "by_layer": layer_summary(table, first)}
    if targets:
        extra["targets"] = pd.concat(targets, ignore_index=True)
    meta = {"n_tokens": P, "n_layers": bridge.cfg.n_layers,
            "statistics": f"by layer: the mean over positions {first}..{P - 1} of this prompt with a 95% bootstrap "
                          f"interval over those positions ({N_BOOT} resamples); positions of one prompt are not "
                          "independent samples, so the interval describes this prompt's spread, not a population's",
            "sites": [s for s in spec.sites if any(k[0] == s for k in keys)], "lenses": list(spec.lenses),
            **extra_meta}
    return Result(table=table, meta=meta, extra=extra)


def layer_summary(table: pd.DataFrame, first: int = 0) -> pd.DataFrame:
    """Per lens, site and layer: the mean over positions (from `first`) of the KL to the final distribution and
    of top-1 agreement with the model's own prediction, each with its 95% bootstrap interval over positions."""
    rows = []
    for (lens, site), g in table[table["pos"] >= first].groupby(["lens", "site"], sort=False):
        g = g.sort_values(["layer", "pos"])
        layers = g["layer"].unique()
        kl = g["kl_to_final"].to_numpy(np.float64).reshape(len(layers), -1)  # [layer, positions]
        agree = (g["top_token"] == g["final_token"]).to_numpy(np.float64).reshape(len(layers), -1)
        kl_m, kl_lo, kl_hi = mean_ci(kl)
        ag_m, ag_lo, ag_hi = mean_ci(agree)
        rows.append(pd.DataFrame({"lens": lens, "site": site, "layer": layers, "n_positions": kl.shape[1],
                                  "kl_mean": kl_m, "kl_low": kl_lo, "kl_high": kl_hi, "top1_agree": ag_m,
                                  "agree_low": ag_lo, "agree_high": ag_hi}))
    return pd.concat(rows, ignore_index=True)


def estimate(plan) -> Estimate:
    """The prompt's forward with every block's input cached, the residual rows of every (site, layer) and their
    norms, the lens kernel's vocabulary blocks (a fixed budget: it never holds rows x vocabulary) and the tables
    (one row per cell, k top tokens and the targets each)."""
    spec, s, P = plan.spec, plan.shape, plan.n_tokens()
    n_rows = len(spec.sites) * s.n_layers * P
    lenses = len(spec.lenses)
    vocab_block = min(s.d_vocab, 16384 if s.device == "cuda" else 8192)
    budget = (256 if s.device == "cuda" else 64) * 2**20
    blocks = min(budget * 5 // 4, n_rows * vocab_block * (16 + 1 + len(spec.targets or spec.target_ids)))
    unembed = s.d_model * s.d_vocab * 4 if s.itemsize != 4 else 0  # the unembedding in float32 for the kernel
    n_targets = len(spec.targets or spec.target_ids)
    return Estimate(parts={"forward": s.forward_bytes(1, P) + s.resid_bytes(1, P, 2 * s.n_layers + 1),
                           "residual rows": (2 + lenses) * n_rows * s.d_model * 4,
                           "vocabulary blocks": blocks + unembed,
                           "tables": lenses * n_rows * 160 * (1 + spec.top_k + n_targets)},
                    flops=s.forward_flops(1, P) + lenses * (2.0 * (n_rows + P) * s.d_model * s.d_vocab
                                                            + s.vocab_flops(n_rows + P, 20)),
                    blocks=s.calls(1) + lenses * s.calls(1),  # the forward; the statistics' vocabulary blocks
                    extra_seconds=lenses * n_rows * (1 + spec.top_k + n_targets) * 2e-6,  # the tables' rows
                    lower="the prompt's length or the sites")
