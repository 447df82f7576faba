"""Memory-light lens statistics over the vocabulary (the Cut Cross-Entropy pattern).

A lens decodes residual vectors h (one per layer and position) as logits z = h' W_U + b_U, where h' is h after
the model's final norm recomputed on h itself (or after a tuned-lens translator), followed by the model's own
element-wise output transform where it has one (Gemma 2's soft-cap). Over the vocabulary this module
computes, per row:

    log-sum-exp, entropy H(p), KL(final || lens), the logits/probabilities/ranks of chosen target tokens, top-k

in blocks of rows x vocabulary, never holding a rows x vocab tensor (a block's temporaries stay within
`budget_bytes`): log-sum-exp and the entropy sum run as
online (rescaled) reductions, ranks count logits above the target's, top-k merges per block. `naive_lens_stats`
is the same computation with the full tensor, for tests and the benchmark.

Plain torch; runs where the inputs are. Logits are computed in float32 whatever the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class LensStats:
    lse: torch.Tensor  # [N] log-sum-exp of the lens logits
    entropy: torch.Tensor  # [N] nats
    kl: torch.Tensor | None  # [N] KL(final || lens), nats (None without a reference)
    target_logprob: torch.Tensor | None  # [N, T]
    target_rank: torch.Tensor | None  # [N, T] 0 = the top token
    top_ids: torch.Tensor  # [N, k]
    top_logprob: torch.Tensor  # [N, k]


def _block_logits(x: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor | None, v0: int, v1: int,
                  transform: Callable | None = None) -> torch.Tensor:
    z = x @ W_U[:, v0:v1].float()
    if b_U is not None:
        z = z + b_U[v0:v1].float()
    return z if transform is None else transform(z)


def lens_stats(
    x: torch.Tensor,
    W_U: torch.Tensor,
    b_U: torch.Tensor | None,
    *,
    ref: torch.Tensor | None = None,
    ref_index: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    k: int = 5,
    vocab_block: int | None = None,
    row_block: int | None = None,
    budget_bytes: int | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LensStats:
    """Statistics of softmax(t(x W_U + b_U)) for normalised rows x [N, d], in blocks.

    ref [M, d]: normalised rows of the reference (final) distribution; ref_index [N] says which reference row
    each row is compared with (KL(ref || lens)). targets [N, T]: token ids whose log-probability and rank are
    reported. Each block holds at most `budget_bytes` of float32 logits (rows x vocabulary). `transform` t: the
    model's element-wise transform of the unembedding's output (`kernels.readout.output_transform`: Gemma 2's
    soft-cap, ...), applied to every block; None: the identity."""
    N, V = x.shape[0], W_U.shape[1]
    dev = x.device
    # CPU: blocks that stay in cache. GPU: fewer, larger blocks (each block is ~15 kernel launches).
    vocab_block = vocab_block or (16384 if dev.type == "cuda" else 8192)
    budget_bytes = budget_bytes or (256 * 2**20 if dev.type == "cuda" else 64 * 2**20)
    x = x.float()
    vocab_block = min(vocab_block, V)
    if row_block is None:  # a block's temporaries: ~4 float32 [rows, vocab_block] tensors, one bool per target
        n_targets = targets.shape[1] if targets is not None else 0
        direct = 12 if (ref is not None and transform is not None) else 0  # the reference rows' block logits
        row_block = max(1, budget_bytes // (vocab_block * (16 + direct + n_targets)))
    k = min(k, V)
    if ref is not None and transform is not None:
        # logits not affine in x: KL(ref || lens) = sum_v p_ref (z_ref - z) + lse - lse_ref, block by block
        # (exactly 0 for a lens row equal to its reference row)
        ref = ref.float()
        ref_lse = lens_stats(ref, W_U, b_U, k=1, vocab_block=vocab_block, budget_bytes=budget_bytes,
                             transform=transform).lse
    elif ref is not None:
        # KL(ref || lens) = E_ref[log p_ref] - E_ref[z] + lse, and E_ref[z] = x . (W_U p_ref) + b_U . p_ref is
        # linear in x: one pass over the reference rows gives W_U p_ref per reference row.
        ref_logp_mean, ref_u, ref_c = _reference_moments(ref.float(), W_U, b_U, vocab_block, budget_bytes)
    lse = torch.empty(N, device=dev)
    ent = torch.empty(N, device=dev)
    kl = torch.empty(N, device=dev) if ref is not None else None
    t_lp = t_rank = None
    if targets is not None:
        t_lp = torch.empty(targets.shape, device=dev)
        t_rank = torch.empty(targets.shape, dtype=torch.long, device=dev)
    top_ids = torch.empty(N, k, dtype=torch.long, device=dev)
    top_val = torch.empty(N, k, device=dev)
    for r0 in range(0, N, row_block):
        r1 = min(N, r0 + row_block)
        xb = x[r0:r1]
        n = r1 - r0
        m = torch.full((n,), -float("inf"), device=dev)  # running max
        s = torch.zeros(n, device=dev)  # sum exp(z - m)
        sz = torch.zeros(n, device=dev)  # sum exp(z - m) * z
        if targets is not None:
            tb = targets[r0:r1]
            # the targets' logits directly (d x T per row), so ranks can be counted block by block
            zt = (xb[:, None, :] * W_U.T[tb].float()).sum(-1)  # [n, T]
            if b_U is not None:
                zt = zt + b_U.float()[tb]
            if transform is not None:
                zt = transform(zt)
            above = torch.zeros(tb.shape, dtype=torch.long, device=dev)
        bv = torch.full((n, k), -float("inf"), device=dev)
        bi = torch.zeros((n, k), dtype=torch.long, device=dev)
        if ref is not None and transform is not None:
            ridx = ref_index[r0:r1]
            rb, rb_lse = ref[ridx], ref_lse[ridx]
            cross = torch.zeros(n, device=dev, dtype=torch.float64)
        for v0 in range(0, V, vocab_block):
            v1 = min(V, v0 + vocab_block)
            z = _block_logits(xb, W_U, b_U, v0, v1, transform)  # [n, vb]
            if ref is not None and transform is not None:
                zr = _block_logits(rb, W_U, b_U, v0, v1, transform)
                cross += (torch.exp(zr - rb_lse[:, None]) * (zr - z)).sum(-1).double()
            bm = z.max(-1).values
            m_new = torch.maximum(m, bm)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * scale + e.sum(-1)
            sz = sz * scale + (e * z).sum(-1)
            m = m_new
            if targets is not None:
                # the target's own logit, recomputed in the block, may round above zt: never count it
                ids = torch.arange(v0, v1, device=dev)
                above += ((z[:, None, :] > zt[:, :, None]) & (ids != tb[:, :, None])).sum(-1)
            kk = min(k, v1 - v0)
            vals, idx = z.topk(kk, dim=-1)
            cat_v = torch.cat([bv, vals], -1)
            cat_i = torch.cat([bi, idx + v0], -1)
            bv, sel = cat_v.topk(k, dim=-1)
            bi = cat_i.gather(1, sel)
        block_lse = m + torch.log(s)
        lse[r0:r1] = block_lse
        ent[r0:r1] = block_lse - sz / s  # H = lse - E_p[z]
        if ref is not None and transform is not None:
            kl[r0:r1] = (cross + (block_lse - rb_lse).double()).float()
        elif ref is not None:
            ridx = ref_index[r0:r1]
            # float64: the three terms are tens of nats each and KL can be 1e-6 (the last layer)
            cross = (xb.double() * ref_u[ridx]).sum(-1) + ref_c[ridx]  # E_ref[z_lens]
            kl[r0:r1] = (ref_logp_mean[ridx] - cross + block_lse.double()).float()
        if targets is not None:
            t_lp[r0:r1] = zt - block_lse[:, None]
            t_rank[r0:r1] = above
        top_ids[r0:r1] = bi
        top_val[r0:r1] = bv - block_lse[:, None]
    return LensStats(lse, ent, kl, t_lp, t_rank, top_ids, top_val)


def _reference_moments(ref: torch.Tensor, W_U, b_U, vocab_block: int, budget_bytes: int):
    """Per reference row: E_p[log p], W_U p [d] and b_U . p, for p = softmax(ref W_U + b_U), in blocks."""
    M, V = ref.shape[0], W_U.shape[1]
    st = lens_stats(ref, W_U, b_U, k=1, vocab_block=vocab_block, budget_bytes=budget_bytes)
    u = torch.zeros(M, W_U.shape[0], device=ref.device, dtype=torch.float64)
    c = torch.zeros(M, device=ref.device, dtype=torch.float64)
    row_block = max(1, budget_bytes // (16 * vocab_block))
    for r0 in range(0, M, row_block):
        r1 = min(M, r0 + row_block)
        for v0 in range(0, V, vocab_block):
            v1 = min(V, v0 + vocab_block)
            z = _block_logits(ref[r0:r1], W_U, b_U, v0, v1).double()
            p = torch.exp(z - st.lse[r0:r1, None].double())
            u[r0:r1] += p @ W_U[:, v0:v1].double().T
            if b_U is not None:
                c[r0:r1] += p @ b_U[v0:v1].double()
    # E_p[log p] = E_p[z] - lse, with E_p[z] through the same float64 dot as the lens rows' cross term, so that a
    # lens row equal to its reference row gets KL = its lse minus the reference's: 0
    neg_ent = (ref.double() * u).sum(-1) + c - st.lse.double()
    return neg_ent, u, c


def naive_lens_stats(x, W_U, b_U, *, ref=None, ref_index=None, targets=None, k: int = 5,
                     transform=None) -> LensStats:
    """The same statistics from the full [N, V] logits (reference implementation)."""
    t = transform or (lambda v: v)
    z = x.float() @ W_U.float()
    if b_U is not None:
        z = z + b_U.float()
    z = t(z)
    logp = z.log_softmax(-1)
    lse = torch.logsumexp(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    kl = None
    if ref is not None:
        zr = t(ref.float() @ W_U.float() + (b_U.float() if b_U is not None else 0))
        lr = zr.log_softmax(-1)[ref_index]
        kl = (lr.exp() * (lr - logp)).sum(-1)
    t_lp = t_rank = None
    if targets is not None:
        zt = z.gather(1, targets)
        t_lp = logp.gather(1, targets)
        t_rank = (z[:, None, :] > zt[:, :, None]).sum(-1)
    top_val, top_ids = logp.topk(min(k, z.shape[1]), dim=-1)
    return LensStats(lse, ent, kl, t_lp, t_rank, top_ids, top_val)
