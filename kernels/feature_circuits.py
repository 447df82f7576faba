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

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .grad import frozen
from .patching import BlockRunner, default_chunk_rows

SUBLAYERS = ("attn_out", "mlp_out")  # a block's attention and MLP outputs, in the order the block runs them
SUBLAYER_HOOKS = {"attn_out": "blocks.{}.hook_attn_out", "mlp_out": "blocks.{}.hook_mlp_out"}


class FeatureStack:
    """SAEs at the residual after blocks `layers` (ascending) of an `n_layers` model, and optionally at attention
    or MLP outputs (`sublayer_saes`: {(site, layer): SAE}, site "attn_out" or "mlp_out").

    Sites, in the order the model computes them: 0 the input; then per block its attention output, its MLP output
    and its residual, where each has an SAE. Site indices are the levels of every per-level list (`Runs.resid`,
    `changes`, the gradients); with residual SAEs alone site k is the residual after block layers[k - 1]. A residual
    site is a cut (everything after it reads the model only through it); a segment is the blocks from one cut to
    the next, and a sublayer site sits in the segment of the first residual SAE at or after its block, so every
    sublayer SAE needs a residual SAE at or after its block."""

    def __init__(self, saes: dict, n_layers: int, skip_first: bool = True, sublayer_saes: dict | None = None):
        self.layers = sorted(int(k) for k in saes)
        if not self.layers:
            raise ValueError("a feature circuit needs at least one SAE")
        if self.layers[0] < 0 or self.layers[-1] >= n_layers:
            raise ValueError(f"SAE layers {self.layers} outside the model's 0..{n_layers - 1}")
        subs = dict(sublayer_saes or {})
        for site, layer in subs:
            if site not in SUBLAYERS:
                raise ValueError(f"a sublayer SAE's site is one of {SUBLAYERS}, not {site!r}")
            if not 0 <= layer <= self.layers[-1]:
                raise ValueError(f"the {site} SAE of block {layer} has no residual SAE at or after its block (the "
                                 f"last is after block {self.layers[-1]})")
        self.n_layers, self.skip_first = n_layers, skip_first
        # sites in the order the model computes them: (kind, block), kind "input", "resid_post" or a sublayer
        order = sorted([("resid_post", la) for la in self.layers] + list(subs),
                       key=lambda s: (s[1], 2 if s[0] == "resid_post" else SUBLAYERS.index(s[0])))
        self.sites = [("input", -1)] + order
        self.saes = [saes[la] if kind == "resid_post" else subs[(kind, la)] for kind, la in order]
        # each site's cut: itself for the input and residuals; for a sublayer site the cut its segment starts at
        self.cut, last = [], 0
        for i, (kind, _) in enumerate(self.sites):
            self.cut.append(last if kind in SUBLAYERS else i)
            if kind not in SUBLAYERS:
                last = i
        # the first block after each cut (the model runs from there); sublayer sites: their segment's start
        self.after = [0 if kind == "input" else layer + 1 if kind == "resid_post" else -1
                      for kind, layer in self.sites]
        for i, (kind, _) in enumerate(self.sites):
            if kind in SUBLAYERS:
                self.after[i] = self.after[self.cut[i]]
        self.cuts = [i for i, (kind, _) in enumerate(self.sites) if kind not in SUBLAYERS]

    @property
    def n_levels(self) -> int:
        return len(self.sites)

    def is_sublayer(self, k: int) -> bool:
        return self.sites[k][0] in SUBLAYERS

    def hook_name(self, k: int) -> str:
        kind, layer = self.sites[k]
        return SUBLAYER_HOOKS[kind].format(layer)

    def segment_end(self, k: int) -> int:
        """The cut that closes the segment site k (a sublayer site or a residual) lies in."""
        return next(j for j in self.cuts if j >= k and j > self.cut[k]) if self.is_sublayer(k) else k

    def upstream(self, k: int) -> list[int]:
        """The sites whose nodes have edges into site k >= 1: the cut its segment starts at and the sublayer sites
        of the segment before it (Marks et al.: each edge through the direct path, the other sites held fixed)."""
        start = self.cut[k] if self.is_sublayer(k) else self.cuts[self.cuts.index(k) - 1]
        return [start] + [j for j in self.inner(start) if j < k]

    def inner(self, k: int) -> list[int]:
        """The sublayer sites of the segment cut k starts."""
        return [j for j in range(k + 1, self.n_levels) if self.is_sublayer(j) and self.cut[j] == k]

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

    def run_segment(self, runner, x: torch.Tensor, k: int, sublayer_hooks: dict | None = None,
                    start_pos: int = 0) -> torch.Tensor:
        """From cut k's residual x to the next cut's (the final residual after the last), with `sublayer_hooks`
        {site: fn(t) -> t} on the segment's sublayer sites."""
        nxt = self.cuts.index(k) + 1
        stop = self.after[self.cuts[nxt]] if nxt < len(self.cuts) else None
        if self.after[k] >= self.n_layers:  # the residual after the last block
            return x
        hooks = [(self.hook_name(j), lambda t, hook, fn=fn: fn(t)) for j, fn in (sublayer_hooks or {}).items()]
        with runner_hooks(runner, hooks):
            return runner.run(x, self.after[k], stop, start_pos=start_pos)


def runner_hooks(runner, hooks):
    """The bridge's hooks for the length of a run (none: nothing added)."""
    return runner.bridge.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext()


def node_positions(stack: FeatureStack, k: int, nodes: torch.Tensor, n_pos: int) -> torch.Tensor:
    """The position of each node index of level k."""
    if k == 0:
        return nodes
    W = stack.width(k)
    return torch.where(nodes < n_pos * W, nodes // W, nodes - n_pos * W)


@dataclass
class Runs:
    """One batch of prompts (rows): the block runner and the value at every site [B, P, d] (the residual at the
    input and residual sites, the sublayer's output at the others), with each site's split (features, error) and
    the final residual."""

    runner: BlockRunner
    resid: list[torch.Tensor]
    parts: list
    final: torch.Tensor


def record(bridge, stack: FeatureStack, tokens: torch.Tensor) -> Runs:
    runner = BlockRunner(bridge, tokens)
    resid: list = [None] * stack.n_levels
    resid[0] = runner.inputs[0]
    with torch.no_grad():
        for ci, k in enumerate(stack.cuts):
            seen = {}
            subs = {j: (lambda t, j=j: seen.setdefault(j, t)) for j in stack.inner(k)}
            nxt = stack.cuts[ci + 1] if ci + 1 < len(stack.cuts) else None
            stop = stack.after[nxt] if nxt is not None else stack.n_layers
            if not subs and stop < stack.n_layers:  # the recorded block inputs
                y = runner.inputs[stop]
            else:
                y = stack.run_segment(runner, resid[k], k, subs)
            for j, t in seen.items():
                resid[j] = t
            if nxt is not None:
                resid[nxt] = y
            else:
                final = y
        parts = [resid[0]] + [stack.split(k, resid[k]) for k in range(1, stack.n_levels)]
    return Runs(runner, resid, parts, final)


def changes(stack: FeatureStack, base: Runs, source: Runs) -> list:
    """Each level's change from the base run to the source run: Δresid at level 0, (Δfeatures, Δerror) after."""
    out = [source.parts[0] - base.parts[0]]
    for k in range(1, stack.n_levels):
        out.append((source.parts[k][0] - base.parts[k][0], source.parts[k][1] - base.parts[k][1]))
    return out


def _run_on(runner: BlockRunner, stack: FeatureStack, k: int, x: torch.Tensor, cut_resid: torch.Tensor | None,
            start_pos: int = 0) -> torch.Tensor:
    """The final residual with site k at x (rows [N, P, d]): from a cut, the blocks after it; from a sublayer site,
    its segment from the cut's residual `cut_resid` (the same rows) with the site's output replaced by x."""
    if stack.is_sublayer(k):
        c = stack.cut[k]
        y = stack.run_segment(runner, cut_resid, c, {k: lambda t: x.to(t.dtype)})
        k = stack.segment_end(k)
        x = y
    for c in stack.cuts[stack.cuts.index(k):]:
        x = stack.run_segment(runner, x, c, start_pos=start_pos)
    return x


def _metric_from(runner: BlockRunner, stack: FeatureStack, x: torch.Tensor, k: int, metric_rows: Callable,
                 start_pos: int = 0, cut_resid: torch.Tensor | None = None) -> torch.Tensor:
    """The metric [rows] with site k at x, everything after it run (a sublayer site: from `cut_resid`)."""
    return metric_rows(runner.logits(_run_on(runner, stack, k, x, cut_resid, start_pos)))


def level_gradients(bridge, stack: FeatureStack, runs: Runs, metric_rows: Callable,
                    hooks: Sequence = ()) -> list[torch.Tensor]:
    """∂m/∂(each site's value) [B, P, d] on the recorded (base) run, with `hooks` (the LRP rules) in place."""
    runner = runs.runner
    with frozen(bridge), torch.enable_grad(), bridge.hooks(fwd_hooks=list(hooks)):
        xs: list = [None] * stack.n_levels
        xs[0] = runs.resid[0].detach().clone().requires_grad_(True)
        x = xs[0]
        for ci, k in enumerate(stack.cuts):
            def keep(t, j):
                xs[j] = t
                return t
            subs = {j: (lambda t, j=j: keep(t, j)) for j in stack.inner(k)}
            x = stack.run_segment(runner, x, k, subs)
            if ci + 1 < len(stack.cuts):
                xs[stack.cuts[ci + 1]] = x
        m = metric_rows(runner.logits(x))
        grads = torch.autograd.grad(m.sum(), xs)
    return [g.detach() for g in grads]


def integrated_level_gradients(bridge, stack: FeatureStack, base: Runs, source: Runs, metric_rows: Callable,
                               steps: int, max_rows: int = 64,
                               progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """IG's gradients: per site, the mean of ∂m/∂(its value) [B, P, d] over `steps` midpoints of the line from the
    base run's value there to the source run's, every block after it recomputed (a sublayer site: the base run up
    to it). `metric_rows` takes rows laid out (step, pair)."""
    runner = base.runner
    B = base.resid[0].shape[0]
    per = max(1, max_rows // B)
    out = []
    with frozen(bridge), torch.enable_grad():
        for k in range(stack.n_levels):
            lo, hi = base.resid[k], source.resid[k]
            cut = base.resid[stack.cut[k]]
            total = torch.zeros_like(lo, dtype=torch.float32)
            for k0 in range(0, steps, per):
                ks = torch.arange(k0, min(steps, k0 + per), device=lo.device)
                alpha = ((ks.to(lo.dtype) + 0.5) / steps)[:, None, None, None]
                x = (lo[None] + alpha * (hi - lo)[None]).reshape(-1, *lo.shape[1:]).requires_grad_(True)
                m = _metric_from(runner, stack, x, k, metric_rows, cut_resid=cut.repeat(len(ks), 1, 1))
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
    value (its change added to its site's value at its position), everything after it recomputed. Rows laid out
    (node, pair); each chunk runs from its first position on where the model allows (from a cut)."""
    runner = base.runner
    B, P = base.resid[0].shape[:2]
    chunk_rows = chunk_rows or default_chunk_rows(bridge, P)
    per = max(1, chunk_rows // B)
    order = torch.argsort(node_positions(stack, k, nodes, P), stable=True)  # chunks start as late as they can
    out = torch.empty(len(nodes), B)
    x0 = base.resid[k]
    sub = stack.is_sublayer(k)
    with torch.no_grad():
        for c in range(0, len(nodes), per):
            idx = order[c:c + per]
            pos, vec = stack.node_vectors(k, delta[k], nodes[idx], P)  # [n], [n, B, d]
            p0 = int(pos.min()) if runner.suffix_ok and not sub and stack.after[k] < stack.n_layers else 0
            x = x0[None].repeat(len(idx), 1, 1, 1)  # [n, B, P, d]
            x[torch.arange(len(idx)), :, pos] += vec.to(x.dtype)
            x = x[:, :, p0:].reshape(len(idx) * B, P - p0, -1)
            cut = base.resid[stack.cut[k]].repeat(len(idx), 1, 1) if sub else None
            out[idx] = _metric_from(runner, stack, x, k, metric_rows, start_pos=p0,
                                    cut_resid=cut).view(len(idx), B).float().cpu()
            if progress is not None:
                progress(min(c + per, len(nodes)), len(nodes))
    return out


def edges_into(bridge, stack: FeatureStack, base: Runs, delta: list, k: int, grad_k: torch.Tensor,
               targets: torch.Tensor, sources, hooks: Sequence = (), chunk_rows: int | None = None):
    """Edge effects from upstream nodes into nodes `targets` of site k >= 1: each target's value times the
    method's gradient there (`grad_k` [B, P, d] at site k), differentiated at the base run with respect to each
    upstream site's value, every other site held at its base value (the direct path: a sublayer site between them
    does not carry it), times each source's change. `sources`: {site: node indices} over `stack.upstream(k)`
    (a tensor alone: the nodes of the site before k's segment, as with residual SAEs alone) -> {site:
    [n_sources, n_targets, B]} (a tensor for a tensor)."""
    single = isinstance(sources, torch.Tensor)
    if single:
        sources = {stack.upstream(k)[0]: sources}
    runner = base.runner
    B, P = base.resid[0].shape[:2]
    chunk_rows = chunk_rows or default_chunk_rows(bridge, P)
    per = max(1, chunk_rows // B)
    W = stack.width(k)
    up = stack.upstream(k)
    start = up[0]
    out = {j: torch.zeros(len(s), len(targets), B) for j, s in sources.items()}
    vecs = {j: stack.node_vectors(j, delta[j], s, P) for j, s in sources.items()}  # ([S], [S, B, d])
    dec = stack.saes[k - 1].W_dec
    with frozen(bridge), torch.enable_grad(), bridge.hooks(fwd_hooks=list(hooks)):
        for c in range(0, len(targets), per):
            t = targets[c:c + per]
            n = len(t)
            leaves = {j: base.resid[j][None].repeat(n, 1, 1, 1).reshape(n * B, P, -1).requires_grad_(True)
                      for j in up}
            live = {}

            def hold(j):  # an upstream sublayer site: its value the leaf (the base run's, held)
                return lambda x: leaves[j].to(x.dtype)

            subs = {j: hold(j) for j in up[1:]}
            if stack.is_sublayer(k):
                subs[k] = lambda y: live.setdefault("y", y)
            y = stack.run_segment(runner, leaves[start], start, subs)
            y = live["y"] if stack.is_sublayer(k) else y
            acts, err = stack.split(k, y)  # [n B, P, W], [n B, P, d]
            feat = t < P * W
            pos = torch.where(feat, t // W, t - P * W)
            f = torch.where(feat, t % W, 0)
            rows = torch.arange(n * B, device=y.device)
            r_pos, r_f, r_feat = pos.repeat_interleave(B), f.repeat_interleave(B), feat.repeat_interleave(B)
            g = grad_k.float().repeat(n, 1, 1)[rows, r_pos]  # [n B, d] the method's gradient at each target's position
            weight = (g @ dec.float().T)[rows, r_f]  # ∂m/∂a at each feature target
            value = torch.where(r_feat, acts[rows, r_pos, r_f].float() * weight, (err[rows, r_pos].float() * g).sum(-1))
            wanted = [j for j in up if j in sources]
            grads = torch.autograd.grad(value.sum(), [leaves[j] for j in wanted], allow_unused=True)
            for j, gx in zip(wanted, grads):
                if gx is None:  # no path from that site into these targets (a later position's only)
                    continue
                src_pos, src_vec = vecs[j]
                gx = gx.view(n, B, P, -1)[:, :, src_pos].float()  # [n, B, S, d]
                out[j][:, c:c + n] = torch.einsum("nbsd,sbd->snb", gx, src_vec.float()).cpu()
    return out[next(iter(sources))] if single else out


def evaluate(bridge, stack: FeatureStack, runs: Runs, means: list, circuits: Sequence[tuple],
             metric_rows: Callable, chunk_rows: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The metric [C, B] of each circuit on the recorded runs, every node outside it at its mean. `means[k]`:
    level 0's mean residual [P, d], then each site's (mean features [P, W], mean error [P, d]); or the same per
    row ([B, P, ...]: another run's values, pair by pair). A circuit is
    (keep, complement): `keep[k]` a LongTensor of site k's kept node indices; with `complement` the circuit's
    nodes are the ones ablated (the model without the circuit). Sites are ablated in the order the model computes
    them, so later sites see the earlier ablations."""
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

    def ablated(k, y, m, c):
        acts, err = stack.split(k, y)
        W = stack.width(k)
        keep_f = m[..., :P * W].reshape(c, 1, P, W)
        keep_e = m[..., P * W:].reshape(c, 1, P, 1)
        acts = torch.where(keep_f, acts.view(c, B, P, W), means[k][0].to(acts.dtype))
        err = torch.where(keep_e, err.view(c, B, P, -1), means[k][1].to(err.dtype))
        return stack.join(k, acts.reshape(c * B, P, W), err.reshape(c * B, P, -1)).to(y.dtype)

    with torch.no_grad():
        for c0 in range(0, len(circuits), per):
            chunk = circuits[c0:c0 + per]
            c = len(chunk)
            x = runs.resid[0][None].repeat(c, 1, 1, 1)  # [c, B, P, d]
            x = torch.where(masks(chunk, 0)[..., None], x, means[0].to(x.dtype)).reshape(c * B, P, -1)
            for ci, k in enumerate(stack.cuts):
                site_masks = {j: masks(chunk, j) for j in stack.inner(k)}
                subs = {j: (lambda y, j=j: ablated(j, y, site_masks[j], c)) for j in site_masks}
                x = stack.run_segment(runner, x, k, subs)
                if ci + 1 < len(stack.cuts):
                    nxt = stack.cuts[ci + 1]
                    x = ablated(nxt, x, masks(chunk, nxt), c).to(runs.resid[0].dtype)
            out[c0:c0 + c] = metric_rows(runner.logits(x)).view(c, B).float().cpu()
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
