"""Feature circuits (Marks et al. 2024, "Sparse feature circuits"): sparse autoencoders at residual streams make
every residual a sum of nodes, and circuits are sets of those nodes and the edges between them.

Levels: level 0 is the input (the residual entering block 0), one node per position; level k >= 1 is the residual
after block `layers[k - 1]` (hook_resid_post) with an SAE, split exactly into its features and an error node:

    a = encode(R)                 [B, P, W]    position 0 not decomposed (a[:, 0] = 0): the attention sink
    e = R - decode(a)             [B, P, d]    so R = a @ W_dec + b_dec + e, node by node

Everything level k receives from earlier comes through level k - 1 (the blocks between them read nothing else), so
the graph of nodes and edges between successive levels is complete. Node indices in a level: input positions p
(level 0); features p * W + f, then error nodes P * W + p (levels >= 1).

Node effects on a metric m of the final-position logits, for the change from a base run to a source run (patched
minus unpatched):

    activation patching   m(base run with that node alone at its source value, everything after it recomputed)
                          - m(base run)
    AtP                   Δnode · ∂m/∂node at the base run
    IG                    Δnode · the mean of ∂m/∂node over `steps` points on the line between the two runs'
                          residuals at the node's level (midpoints; everything after it recomputed)
    RelP                  AtP with the LRP rules (kernels/attribution.py) in the backward pass

A feature's gradient is W_dec · ∂m/∂R, an error node's is ∂m/∂R: one gradient per level serves every node.

Edges (Marks et al., eq. 5) from node u of level k - 1 to node d of level k:

    edge(u -> d) = Δu · ∂(g_d · d)/∂u

with g_d the method's gradient at d (AtP's, IG's mean or RelP's) and the Jacobian the blocks' between the two levels
at the base run (under the LRP rules for RelP). The edges into d add up to the first-order change of g_d · d from
all of level k - 1's changes. The last level's nodes reach the logits with their node effects.

Circuits are evaluated by mean ablation (`evaluate`): on the given runs, every node outside the circuit takes its
mean over a reference set, level by level, so later levels see the earlier ablations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .grad import frozen
from .patching import BlockRunner, default_chunk_rows


class FeatureStack:
    """SAEs at the residual after blocks `layers` (ascending) of an `n_layers` model."""

    def __init__(self, saes: dict, n_layers: int, skip_first: bool = True):
        self.layers = sorted(int(k) for k in saes)
        if not self.layers:
            raise ValueError("a feature circuit needs at least one SAE")
        if self.layers[0] < 0 or self.layers[-1] >= n_layers:
            raise ValueError(f"SAE layers {self.layers} outside the model's 0..{n_layers - 1}")
        self.saes = [saes[layer] for layer in self.layers]
        self.n_layers, self.skip_first = n_layers, skip_first
        # the first block after each level; level K's blocks run to the end
        self.after = [0] + [layer + 1 for layer in self.layers]

    @property
    def n_levels(self) -> int:
        return len(self.layers) + 1

    def width(self, k: int) -> int:
        return self.saes[k - 1].d_sae

    def n_nodes(self, k: int, n_pos: int) -> int:
        return n_pos if k == 0 else n_pos * (self.width(k) + 1)

    def split(self, k: int, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual [N, P, d] at level k >= 1 -> (features [N, P, W], error [N, P, d])."""
        sae = self.saes[k - 1]
        acts = sae.encode(resid)
        if self.skip_first:
            acts = torch.cat([torch.zeros_like(acts[:, :1]), acts[:, 1:]], 1)
        return acts, resid.to(acts.dtype) - sae.decode(acts)

    def join(self, k: int, acts: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        return self.saes[k - 1].decode(acts) + err

    def scores(self, k: int, delta: tuple, grad: torch.Tensor) -> torch.Tensor:
        """Per-row node scores [B, n_nodes] of level k: the change (Δresid [B, P, d] at level 0, else (Δfeatures,
        Δerror)) times the gradient at the level's residual [B, P, d]."""
        grad = grad.float()
        if k == 0:
            return (delta.float() * grad).sum(-1)
        d_acts, d_err = delta
        feats = d_acts.float() * (grad @ self.saes[k - 1].W_dec.float().T)  # [B, P, W]
        return torch.cat([feats.flatten(1), (d_err.float() * grad).sum(-1)], 1)

    def node_vectors(self, k: int, delta: tuple, nodes: torch.Tensor, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [n], what each node's change adds to its residual [n, B, d]) for node indices of level k."""
        if k == 0:
            return nodes, delta[:, nodes].transpose(0, 1)
        d_acts, d_err = delta
        W = self.width(k)
        feat = nodes < n_pos * W
        pos = torch.where(feat, nodes // W, nodes - n_pos * W)
        f = torch.where(feat, nodes % W, 0)
        dec = self.saes[k - 1].W_dec.to(d_err.dtype)
        vec = torch.where(feat[:, None, None], d_acts[:, pos, f].T[:, :, None] * dec[f][:, None],
                          d_err[:, pos].transpose(0, 1))
        return pos, vec


def node_positions(stack: FeatureStack, k: int, nodes: torch.Tensor, n_pos: int) -> torch.Tensor:
    """The position of each node index of level k."""
    if k == 0:
        return nodes
    W = stack.width(k)
    return torch.where(nodes < n_pos * W, nodes // W, nodes - n_pos * W)


@dataclass
class Runs:
    """One batch of prompts (rows): the block runner and the residual at every level [B, P, d], with each level's
    split (features, error) and the final residual."""

    runner: BlockRunner
    resid: list[torch.Tensor]
    parts: list
    final: torch.Tensor


def record(bridge, stack: FeatureStack, tokens: torch.Tensor) -> Runs:
    runner = BlockRunner(bridge, tokens)
    with torch.no_grad():
        resid = [runner.inputs[0]]
        for k in range(1, stack.n_levels):
            start, stop = stack.after[k - 1], stack.after[k]
            resid.append(runner.inputs[stop] if stop < stack.n_layers else runner.run(resid[-1], start, stop))
        final = resid[-1] if stack.after[-1] >= stack.n_layers else runner.run(resid[-1], stack.after[-1])
        parts = [resid[0]] + [stack.split(k, resid[k]) for k in range(1, stack.n_levels)]
    return Runs(runner, resid, parts, final)


def changes(stack: FeatureStack, base: Runs, source: Runs) -> list:
    """Each level's change from the base run to the source run: Δresid at level 0, (Δfeatures, Δerror) after."""
    out = [source.parts[0] - base.parts[0]]
    for k in range(1, stack.n_levels):
        out.append((source.parts[k][0] - base.parts[k][0], source.parts[k][1] - base.parts[k][1]))
    return out


def _metric_from(runner: BlockRunner, stack: FeatureStack, x: torch.Tensor, k: int, metric_rows: Callable,
                 start_pos: int = 0) -> torch.Tensor:
    """The metric [rows] of residuals x at level k, the blocks after it run."""
    if stack.after[k] < stack.n_layers:
        x = runner.run(x, stack.after[k], start_pos=start_pos)
    return metric_rows(runner.logits(x))


def level_gradients(bridge, stack: FeatureStack, runs: Runs, metric_rows: Callable,
                    hooks: Sequence = ()) -> list[torch.Tensor]:
    """∂m/∂R at every level [B, P, d] on the recorded (base) run, with `hooks` (the LRP rules) in place."""
    runner = runs.runner
    with frozen(bridge), torch.enable_grad(), bridge.hooks(fwd_hooks=list(hooks)):
        xs = [runs.resid[0].detach().clone().requires_grad_(True)]
        for k in range(1, stack.n_levels):
            xs.append(runner.run(xs[-1], stack.after[k - 1], stack.after[k]))
        m = _metric_from(runner, stack, xs[-1], stack.n_levels - 1, metric_rows)
        grads = torch.autograd.grad(m.sum(), xs)
    return [g.detach() for g in grads]


def integrated_level_gradients(bridge, stack: FeatureStack, base: Runs, source: Runs, metric_rows: Callable,
                               steps: int, max_rows: int = 64,
                               progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """IG's gradients: per level, the mean of ∂m/∂R [B, P, d] over `steps` midpoints of the line from the base
    run's residual at that level to the source run's, every block after it recomputed. `metric_rows` takes rows
    laid out (step, pair)."""
    runner = base.runner
    B = base.resid[0].shape[0]
    per = max(1, max_rows // B)
    out = []
    with frozen(bridge), torch.enable_grad():
        for k in range(stack.n_levels):
            lo, hi = base.resid[k], source.resid[k]
            total = torch.zeros_like(lo, dtype=torch.float32)
            for k0 in range(0, steps, per):
                ks = torch.arange(k0, min(steps, k0 + per), device=lo.device)
                alpha = ((ks.to(lo.dtype) + 0.5) / steps)[:, None, None, None]
                x = (lo[None] + alpha * (hi - lo)[None]).reshape(-1, *lo.shape[1:]).requires_grad_(True)
                m = _metric_from(runner, stack, x, k, metric_rows)
                (g,) = torch.autograd.grad(m.sum(), x)
                total += g.view(len(ks), *lo.shape).float().sum(0)
            out.append(total / steps)
            if progress is not None:
                progress(k + 1, stack.n_levels)
    return out


def patch_nodes(bridge, stack: FeatureStack, base: Runs, delta: list, k: int, nodes: torch.Tensor,
                metric_rows: Callable, chunk_rows: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Activation patching: the metric [n, B] of the base run with node `nodes[i]` of level k alone at its source
    value (its change added to the residual at its position), everything after it recomputed. Rows laid out
    (node, pair); each chunk runs from its first position on where the model allows."""
    runner = base.runner
    B, P = base.resid[0].shape[:2]
    chunk_rows = chunk_rows or default_chunk_rows(bridge, P)
    per = max(1, chunk_rows // B)
    order = torch.argsort(node_positions(stack, k, nodes, P), stable=True)  # chunks start as late as they can
    out = torch.empty(len(nodes), B)
    x0 = base.resid[k]
    with torch.no_grad():
        for c in range(0, len(nodes), per):
            idx = order[c:c + per]
            pos, vec = stack.node_vectors(k, delta[k], nodes[idx], P)  # [n], [n, B, d]
            p0 = int(pos.min()) if runner.suffix_ok and stack.after[k] < stack.n_layers else 0
            x = x0[None].repeat(len(idx), 1, 1, 1)  # [n, B, P, d]
            x[torch.arange(len(idx)), :, pos] += vec.to(x.dtype)
            x = x[:, :, p0:].reshape(len(idx) * B, P - p0, -1)
            out[idx] = _metric_from(runner, stack, x, k, metric_rows, start_pos=p0).view(len(idx), B).float().cpu()
            if progress is not None:
                progress(min(c + per, len(nodes)), len(nodes))
    return out


def edges_into(bridge, stack: FeatureStack, base: Runs, delta: list, k: int, grad_k: torch.Tensor,
               targets: torch.Tensor, sources: torch.Tensor, hooks: Sequence = (), chunk_rows: int | None = None
               ) -> torch.Tensor:
    """Edge effects [n_sources, n_targets, B] from nodes `sources` of level k - 1 into nodes `targets` of level
    k >= 1: each target's value times the method's gradient there (`grad_k` [B, P, d] at level k's residual),
    differentiated through the blocks between the levels at the base run, times each source's change."""
    runner = base.runner
    B, P = base.resid[0].shape[:2]
    chunk_rows = chunk_rows or default_chunk_rows(bridge, P)
    per = max(1, chunk_rows // B)
    W = stack.width(k)
    out = torch.zeros(len(sources), len(targets), B)
    src_pos, src_vec = stack.node_vectors(k - 1, delta[k - 1], sources, P)  # [S], [S, B, d]
    dec = stack.saes[k - 1].W_dec
    with frozen(bridge), torch.enable_grad(), bridge.hooks(fwd_hooks=list(hooks)):
        for c in range(0, len(targets), per):
            t = targets[c:c + per]
            n = len(t)
            x = base.resid[k - 1][None].repeat(n, 1, 1, 1).reshape(n * B, P, -1).requires_grad_(True)
            y = runner.run(x, stack.after[k - 1], stack.after[k])
            acts, err = stack.split(k, y)  # [n B, P, W], [n B, P, d]
            feat = t < P * W
            pos = torch.where(feat, t // W, t - P * W)
            f = torch.where(feat, t % W, 0)
            rows = torch.arange(n * B, device=x.device)
            r_pos, r_f, r_feat = pos.repeat_interleave(B), f.repeat_interleave(B), feat.repeat_interleave(B)
            g = grad_k.float().repeat(n, 1, 1)[rows, r_pos]  # [n B, d] the method's gradient at each target's position
            weight = (g @ dec.float().T)[rows, r_f]  # ∂m/∂a at each feature target
            value = torch.where(r_feat, acts[rows, r_pos, r_f].float() * weight, (err[rows, r_pos].float() * g).sum(-1))
            (gx,) = torch.autograd.grad(value.sum(), x)
            gx = gx.view(n, B, P, -1)[:, :, src_pos].float()  # [n, B, S, d]
            out[:, c:c + n] = torch.einsum("nbsd,sbd->snb", gx, src_vec.float()).cpu()
    return out


def evaluate(bridge, stack: FeatureStack, runs: Runs, means: list, circuits: Sequence[tuple],
             metric_rows: Callable, chunk_rows: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The metric [C, B] of each circuit on the recorded runs, every node outside it at its mean. `means[k]`:
    level 0's mean residual [P, d], then each level's (mean features [P, W], mean error [P, d]); or the same per
    row ([B, P, ...]: another run's values, pair by pair). A circuit is
    (keep, complement): `keep[k]` a LongTensor of level k's kept node indices; with `complement` the circuit's
    nodes are the ones ablated (the model without the circuit)."""
    runner = runs.runner
    B, P = runs.resid[0].shape[:2]
    chunk_rows = chunk_rows or default_chunk_rows(bridge, P)
    per = max(1, chunk_rows // B)
    dev = runs.resid[0].device
    out = torch.empty(len(circuits), B)

    def masks(chunk, k):
        n = stack.n_nodes(k, P)
        m = torch.zeros(len(chunk), n, dtype=torch.bool, device=dev)
        for i, (keep, complement) in enumerate(chunk):
            m[i, keep[k].to(dev)] = True
            if complement:
                m[i] = ~m[i]
        return m[:, None]  # [c, 1, n] broadcast over pairs

    with torch.no_grad():
        for c0 in range(0, len(circuits), per):
            chunk = circuits[c0:c0 + per]
            c = len(chunk)
            x = runs.resid[0][None].repeat(c, 1, 1, 1)  # [c, B, P, d]
            x = torch.where(masks(chunk, 0)[..., None], x, means[0].to(x.dtype)).reshape(c * B, P, -1)
            for k in range(1, stack.n_levels):
                x = runner.run(x, stack.after[k - 1], stack.after[k])
                acts, err = stack.split(k, x)
                W = stack.width(k)
                m = masks(chunk, k)
                keep_f = m[..., :P * W].reshape(c, 1, P, W)
                keep_e = m[..., P * W:].reshape(c, 1, P, 1)
                acts = torch.where(keep_f, acts.view(c, B, P, W), means[k][0].to(acts.dtype))
                err = torch.where(keep_e, err.view(c, B, P, -1), means[k][1].to(err.dtype))
                x = stack.join(k, acts.reshape(c * B, P, W), err.reshape(c * B, P, -1)).to(runs.resid[0].dtype)
            out[c0:c0 + c] = _metric_from(runner, stack, x, stack.n_levels - 1, metric_rows).view(c, B).float().cpu()
            if progress is not None:
                progress(min(c0 + per, len(circuits)), len(circuits))
    return out


def level_means(stack: FeatureStack, runs: Runs) -> list:
    """Each level's mean over the runs' rows, position by position: the values ablated nodes take."""
    out = [runs.parts[0].mean(0)]
    for k in range(1, stack.n_levels):
        acts, err = runs.parts[k]
        out.append((acts.mean(0), err.mean(0)))
    return out
