"""Edge circuits on a TransformerLens 4 `TransformerBridge`: the residual-stream graph, edge scores, edge patching
and circuit evaluation, batched.

The graph is the EAP / EAP-IG library's (Hanna et al.), with its node names:

- writers (sources): `input` (the residual entering block 0: embeddings, positions, an embedding scale),
  `a{l}.h{h}` (head h's result, z_h W_O[h], before the heads are summed) and `m{l}` (layer l's MLP output);
- readers (targets): `a{l}.h{h}<q>`, `<k>`, `<v>` (the residual head h's query, key or value projection reads,
  before its norm), `m{l}` (the residual the MLP reads, before its norm) and `logits` (the final residual).

Every reader's input is the sum of the outputs of the writers before it plus constants (output biases), so an
edge u -> d is u's output as d reads it. A key/value reader of a grouped-query model is a key/value head, read by
several query heads: `a{l}.h{g}<k>` names key/value head g there (the EAP-IG library instead copies the shared
weights per query head). On a model whose attention and MLP run in parallel the MLP does not read its own layer's
heads.

Edges can also be taken by position, u@p -> d@p (the residual stream at p carries a writer's output at p to the
readers at p; positions meet only inside attention, a head at p reading its keys and values up to p): scores by
position (`edge_scores_from(per_position=True)`), one edge patched at one position (`edge_patch(positions=...)`),
circuits kept at some positions only (`evaluate_circuits` with a [K, S, n_sources, n_targets] mask) and their
pruning (`on_paths_by_position`).

The bridge computes these inputs and outputs itself when its `use_attn_result`, `use_split_qkv_input` and
`use_hook_mlp_in` flags are on (`edge_hooks`); `check_additive` refuses a model where they do not add up (a norm
after the head sum, as Gemma's). Conventions are the patching kernels': the *base* run is the one patched, the
*source* run supplies the patched-in values, and an edge's effect is the metric with that edge alone carrying the
source value minus the base run's metric.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .grad import frozen
from .patching import BlockRunner, default_chunk_rows

FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")
INPUT_HOOK = "blocks.0.hook_resid_pre"


@contextlib.contextmanager
def edge_hooks(bridge, on: bool = True) -> Iterator[None]:
    """The bridge's per-head result, split q/k/v input and MLP input hooks on (off with on=False: the model as
    every other analysis sees it, for a pause in which another run may go first); the flags as they were after."""
    cfg = bridge.cfg
    saved = {f: bool(getattr(cfg, f, False)) for f in FLAGS}
    attn_in = bool(getattr(cfg, "use_attn_in", False))
    try:
        if attn_in and on:
            bridge.set_use_attn_in(False)
        for f in FLAGS:
            if saved[f] != on:
                getattr(bridge, f"set_{f}")(on)
        yield
    finally:
        for f in FLAGS:
            if bool(getattr(cfg, f, False)) != saved[f]:
                getattr(bridge, f"set_{f}")(saved[f])
        if attn_in and on:
            bridge.set_use_attn_in(True)


@dataclass(frozen=True)
class Reader:
    name: str  # EAP-IG name: a{l}.h{h}<q>, m{l}, logits
    layer: int  # n_layers for logits
    kind: str  # q, k, v, mlp, logits
    head: int  # -1 where there is none
    n_sources: int  # the writers before it: sources[:n_sources] feed it


class EdgeGraph:
    """Sources (writers) and targets (readers) of a model's residual-stream graph, in the EAP-IG library's order:
    a score matrix is [n_sources, n_targets] and `mask` marks the edges that exist."""

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel: bool = False):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.parallel = parallel
        self.sources = ["input"]
        self.source_layer = [-1]
        self.readers: list[Reader] = []
        for layer in range(n_layers):
            before = len(self.sources)
            for kind, count in (("q", n_heads), ("k", self.n_kv_heads), ("v", self.n_kv_heads)):
                self.readers += [Reader(f"a{layer}.h{h}<{kind}>", layer, kind, h, before) for h in range(count)]
            self.sources += [f"a{layer}.h{h}" for h in range(n_heads)]
            self.source_layer += [layer] * n_heads
            self.readers.append(Reader(f"m{layer}", layer, "mlp", -1, before if parallel else len(self.sources)))
            self.sources.append(f"m{layer}")
            self.source_layer.append(layer)
        self.readers.append(Reader("logits", n_layers, "logits", -1, len(self.sources)))
        self.targets = [r.name for r in self.readers]
        self.mask = torch.zeros(len(self.sources), len(self.readers), dtype=torch.bool)
        for j, r in enumerate(self.readers):
            self.mask[: r.n_sources, j] = True
        self.edges = self.mask.nonzero().tolist()  # [(source, target)] in source-major order
        self.source_index = {s: i for i, s in enumerate(self.sources)}
        self.target_index = {t: j for j, t in enumerate(self.targets)}

    @classmethod
    def of(cls, bridge) -> "EdgeGraph":
        cfg = bridge.cfg
        kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        return cls(cfg.n_layers, cfg.n_heads, kv, bool(getattr(cfg, "parallel_attn_mlp", False)))

    def edge_name(self, u: int, d: int) -> str:
        return f"{self.sources[u]}->{self.targets[d]}"

    def positioned(self, n_pos: int) -> torch.Tensor:
        """[n_pos, n_sources, n_targets] (bool): the edges by position, u@p -> d@p, at `n_pos` positions (every edge
        at every position, but the logits read the last position only)."""
        m = self.mask[None].expand(n_pos, -1, -1).clone()
        m[:-1, :, -1] = False
        return m

    def layer_readers(self, layer: int) -> list[int]:
        return [j for j, r in enumerate(self.readers) if r.layer == layer]


def positioned_edges(graph: EdgeGraph, n_pos: int) -> torch.Tensor:
    """The edges by position [E, 3] (position, source, target), position-major."""
    return graph.positioned(n_pos).nonzero()


# --------------------------------------------------------------------------------------------------------------
# Writers' outputs and readers' inputs of one run
# --------------------------------------------------------------------------------------------------------------
def _writer_hooks(graph: EdgeGraph) -> list[str]:
    names = [INPUT_HOOK]
    for layer in range(graph.n_layers):
        names += [f"blocks.{layer}.attn.hook_result", f"blocks.{layer}.hook_mlp_out"]
    return names


def _reader_hooks(graph: EdgeGraph) -> list[str]:
    names = []
    for layer in range(graph.n_layers):
        names += [f"blocks.{layer}.attn.hook_{k}_input" for k in "qkv"] + [f"blocks.{layer}.hook_mlp_in"]
    return names + [f"blocks.{graph.n_layers - 1}.hook_resid_post"]


def stack_writers(graph: EdgeGraph, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Writers' outputs [B, S, n_sources, D] from the hooks' tensors, in source order."""
    parts = [acts[INPUT_HOOK][:, :, None]]
    for layer in range(graph.n_layers):
        parts += [acts[f"blocks.{layer}.attn.hook_result"], acts[f"blocks.{layer}.hook_mlp_out"][:, :, None]]
    return torch.cat(parts, 2)


def stack_readers(graph: EdgeGraph, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Readers' inputs (or their gradients) [B, S, n_targets, D] from the hooks' tensors, in target order."""
    parts = []
    for layer in range(graph.n_layers):
        parts += [acts[f"blocks.{layer}.attn.hook_{k}_input"] for k in "qkv"]
        parts.append(acts[f"blocks.{layer}.hook_mlp_in"][:, :, None])
    parts.append(acts[f"blocks.{graph.n_layers - 1}.hook_resid_post"][:, :, None])
    return torch.cat(parts, 2)


def check_edge_hooks(bridge) -> None:
    """Refuses a model whose blocks lack what the graph needs: attention in every block with the split inputs and
    per-head results."""
    names = bridge.hook_dict
    graph = EdgeGraph.of(bridge)
    missing = [n for n in _writer_hooks(graph) + _reader_hooks(graph) if n not in names]
    if missing:
        raise ValueError(f"this model's blocks do not all have the hooks an edge graph needs ({missing[0]}"
                         f"{' and ' + str(len(missing) - 1) + ' more' if len(missing) > 1 else ''})")


def record(bridge, graph: EdgeGraph, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of `tokens` (edge hooks on): writers' outputs [B, S, n_sources, D], readers' inputs
    [B, S, n_targets, D] and the final-position logits [B, d_vocab]."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(t, hook):
            acts[name] = t.detach()
            return t
        return hook

    hooks = [(n, keep(n)) for n in _writer_hooks(graph) + _reader_hooks(graph)]
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        logits = bridge(tokens, return_type="logits")[:, -1]
    return stack_writers(graph, acts), stack_readers(graph, acts), logits


def check_additive(graph: EdgeGraph, writers: torch.Tensor, readers: torch.Tensor, rtol: float | None = None) -> None:
    """Each reader's input must be the sum of its writers' outputs and a constant (biases, the same at every row
    and position): else an edge is not the writer's output as the reader reads it (a norm or scale after the
    head sum, as in Gemma's blocks) and edge scores would mean nothing. The tolerance is the dtype's rounding
    over a sum of many writers (a structural difference is of the order of the input itself)."""
    if rtol is None:
        rtol = 1e-3 if writers.dtype in (torch.float32, torch.float64) else 5e-2
    csum = writers.double().cumsum(2)  # [B, S, n_sources, D]
    for j, r in enumerate(graph.readers):
        rest = readers[:, :, j].double() - csum[:, :, r.n_sources - 1]
        rest = rest - rest.mean((0, 1), keepdim=True)
        scale = readers[:, :, j].double().norm().clamp_min(1e-12)
        if float(rest.norm() / scale) > rtol:
            raise ValueError(f"{r.name}'s input is not the sum of its writers' outputs (off by "
                             f"{float(rest.norm() / scale):.2g} of its norm): the blocks normalise or scale the "
                             "heads' or MLP's output before it joins the residual stream")


# --------------------------------------------------------------------------------------------------------------
# Gradient scores: EAP, EAP-IG, RelP
# --------------------------------------------------------------------------------------------------------------
def _frozen_scale_norm(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm's forward with its scale (1 / standard deviation or 1 / RMS) a constant: RelP's LN rule, for the
    per-head copies of a block's first norm that the split q/k/v inputs run through (the bridge runs those through
    the transformers module itself, so the rule's hook on the bridge's norm does not reach them)."""
    eps = getattr(module, "eps", None)
    eps = getattr(module, "variance_epsilon", eps)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    layer_norm = isinstance(module, torch.nn.LayerNorm)
    if eps is None or not (layer_norm or type(module).__name__.endswith("RMSNorm")):
        raise ValueError(f"RelP's LN rule on the split q/k/v inputs knows LayerNorm and RMSNorm, not "
                         f"{type(module).__name__}")
    plain = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if layer_norm:
            xc = xf - xf.mean(-1, keepdim=True)
            scale = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        else:
            xc = xf
            scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = xc * scale.detach()
        y = y.to(x.dtype) * weight if weight is not None else y.to(x.dtype)
        if bias is not None:
            y = y + bias
        want = plain(x)
        if not torch.allclose(y, want, atol=1e-4, rtol=1e-3):  # a norm of another form (Gemma's 1 + w, ...)
            raise ValueError(f"RelP's LN rule: {type(module).__name__} is not a plain LayerNorm or RMSNorm")
        return want.detach() + (y - y.detach())
    return forward


@contextlib.contextmanager
def per_head_ln_rule(bridge) -> Iterator[None]:
    """RelP's LN rule on the per-head norms of the split q/k/v inputs, for the length of the block."""
    patched = []
    try:
        for block in bridge.blocks:
            ln1 = getattr(block, "ln1", None)
            raw = getattr(ln1, "original_component", None)
            if raw is not None:
                raw.forward = _frozen_scale_norm(raw)
                patched.append(raw)
        yield
    finally:
        for raw in patched:
            del raw.forward


def reader_gradients(bridge, graph: EdgeGraph, tokens: torch.Tensor, metric_rows: Callable, *,
                     input_values: torch.Tensor | None = None, rules=None, fold: int = 1) -> torch.Tensor:
    """d(sum of the rows' metrics)/d(each reader's input) [N, S, n_targets, D] on a run of `tokens` [N, P];
    with `input_values` [N, P, D] the residual entering block 0 is replaced by them (an integrated-gradients
    step). With `rules` (kernels.attribution.LRPRules) the backward pass is RelP's. With `fold` > 1 the rows are
    laid out (fold, B) and the gradients summed over the first: [B, S, n_targets, D]."""
    from .attribution import lrp_hooks

    extra_hooks = lrp_hooks(bridge, rules) if rules is not None else []
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(t, hook):
            # a tensor of its own: the MLP's input hook gets the residual itself, whose gradient would also hold
            # the residual path's; the clone's is what flows through this reader alone
            t = t.clone()
            if t.requires_grad:
                t.retain_grad()
            acts[name] = t
            return t
        return hook

    def start(act, hook):  # weights stay frozen: the graph starts at the first block's input
        x = act if input_values is None else input_values.to(act)
        return x.detach().requires_grad_(True)

    hooks = [(INPUT_HOOK, start)] + list(extra_hooks) + [(n, keep(n)) for n in _reader_hooks(graph)]
    ln_rule = per_head_ln_rule(bridge) if rules is not None and rules.ln else contextlib.nullcontext()
    with frozen(bridge), torch.enable_grad(), bridge.hooks(fwd_hooks=hooks), ln_rule, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*edited hook_scale/hook_normalized.*")  # the LN rule's edit
        logits = bridge(tokens, return_type="logits")[:, -1]
        metric_rows(logits).sum().backward()
    grads = {}
    for name, t in acts.items():
        if t.grad is None:
            raise ValueError(f"no gradient reached {name}")
        g = t.grad.detach()
        grads[name] = g.reshape(fold, -1, *g.shape[1:]).sum(0) if fold > 1 else g
    return stack_readers(graph, grads)


def edge_scores_from(graph: EdgeGraph, delta: torch.Tensor, grads: torch.Tensor,
                     per_position: bool = False) -> torch.Tensor:
    """Per-row edge scores [B, n_sources, n_targets] (zero where there is no edge): each source's change
    (source run - base run) [B, S, n_sources, D] dotted with each reader's gradient [B, S, n_targets, D], summed over
    positions; with `per_position` one score per position, [B, S, n_sources, n_targets] (the edge u@p -> d@p: the
    residual stream at p carries a writer's output at p to the readers at p only)."""
    out = torch.einsum("bsud,bsvd->bsuv" if per_position else "bsud,bsvd->buv", delta.float(), grads.float())
    return out * graph.mask.to(out.device)


def integrated_reader_gradients(bridge, graph: EdgeGraph, base_tokens: torch.Tensor, base_input: torch.Tensor,
                                source_input: torch.Tensor, metric_rows: Callable, steps: int,
                                max_rows: int = 64, progress: Callable | None = None, rules=None) -> torch.Tensor:
    """EAP-IG's gradients: the mean over `steps` points of the path from the base run's input (the residual
    entering block 0) to the source run's, the midpoints (k + 1/2) / steps, of the readers' gradients
    [B, S, n_targets, D]. `metric_rows` maps logits whose rows are laid out (step, pair) to per-row metrics."""
    B = base_tokens.shape[0]
    per = max(1, max_rows // B)  # steps per forward
    total = None
    for k0 in range(0, steps, per):
        ks = torch.arange(k0, min(steps, k0 + per), device=base_input.device)
        alpha = ((ks.to(base_input.dtype) + 0.5) / steps)[:, None, None, None]  # [k, 1, 1, 1]
        x = (base_input[None] + alpha * (source_input - base_input)[None]).reshape(-1, *base_input.shape[1:])
        g = reader_gradients(bridge, graph, base_tokens.repeat(len(ks), 1), metric_rows, input_values=x,
                             rules=rules, fold=len(ks))
        total = g if total is None else total + g
        if progress is not None:
            progress(min(steps, k0 + per), steps)
    return total / steps


# --------------------------------------------------------------------------------------------------------------
# Rows per forward
# --------------------------------------------------------------------------------------------------------------
ROW_BUDGET = 64 * 2**20  # bytes of per-row tensors a forward of edge patches or circuits holds (CPU and GPU)


def split_row_bytes(graph: EdgeGraph, d_model: int, n_pos: int) -> int:
    """A row's per-head copies of a block's input (q, k and v inputs, before and after their norms)."""
    return 2 * 4 * n_pos * (graph.n_heads + 2 * graph.n_kv_heads) * d_model


def circuit_row_bytes(graph: EdgeGraph, d_model: int, n_pos: int) -> int:
    """A row of a circuit forward: every writer's (live - replacement) and a running sum per writer hook, besides
    the split copies."""
    return 4 * n_pos * d_model * (len(graph.sources) + len(_writer_groups(graph))) + split_row_bytes(
        graph, d_model, n_pos)


def patch_rows(graph: EdgeGraph, bridge, n_pos: int) -> int:
    """Rows per forward of edge patches: the patching kernels' chunk, fewer where the split copies would outgrow
    the budget."""
    per = split_row_bytes(graph, bridge.cfg.d_model, n_pos)
    return max(1, min(default_chunk_rows(bridge, n_pos), ROW_BUDGET // per))


def circuit_rows(graph: EdgeGraph, bridge, n_pos: int) -> int:
    return max(1, min(default_chunk_rows(bridge, n_pos), ROW_BUDGET // circuit_row_bytes(graph, bridge.cfg.d_model,
                                                                                           n_pos)))


# --------------------------------------------------------------------------------------------------------------
# Edge activation patching: one edge carries the source value, everything downstream recomputed
# --------------------------------------------------------------------------------------------------------------
def _reader_edit_hooks(graph: EdgeGraph, layer: int, row_target: torch.Tensor, row_delta: torch.Tensor):
    """Hooks on block `layer` that add row_delta[i] [S, D] to the input of reader row_target[i] (a target index of
    that layer) in row i."""
    hooks = []
    rows = torch.arange(len(row_target), device=row_delta.device)
    for kind in ("q", "k", "v", "mlp"):
        js = [j for j in graph.layer_readers(layer) if graph.readers[j].kind == kind]
        if not js:
            continue
        sel = torch.isin(row_target, torch.tensor(js, device=row_target.device))
        if not bool(sel.any()):
            continue
        r = rows[sel]
        heads = torch.tensor([graph.readers[j].head for j in row_target[sel].tolist()], device=r.device)
        d = row_delta[sel]
        if kind == "mlp":
            def edit(x, hook, r=r, d=d):
                x = x.clone()
                x[r] += d.to(x)
                return x
            hooks.append((f"blocks.{layer}.hook_mlp_in", edit))
        else:
            def edit(x, hook, r=r, h=heads, d=d):
                x = x.clone()
                x[r, :, h] += d.to(x)
                return x
            hooks.append((f"blocks.{layer}.attn.hook_{kind}_input", edit))
    return hooks


def edge_patch(bridge, graph: EdgeGraph, runner: BlockRunner, final_resid: torch.Tensor, delta: torch.Tensor,
               edges: list[tuple[int, int]], metric_rows: Callable, chunk_rows: int | None = None,
               progress: Callable | None = None, positions: list[int] | None = None) -> torch.Tensor:
    """The base run's metric with each edge alone patched: [len(edges), B], rows of `metric_rows` laid out
    (edge, pair). `runner` recorded the base run with edge hooks on; `final_resid` [B, S, D] is its final
    residual; `delta` [B, S, n_sources, D] the writers' source - base outputs. With `positions` (one per edge) the
    edge is patched at that position only (u@p -> d@p)."""
    B, S = runner.tokens.shape
    chunk_rows = chunk_rows or patch_rows(graph, bridge, S)
    out = torch.empty(len(edges), B, device=delta.device)
    by_layer: dict[int, list[int]] = {}
    for i, (u, d) in enumerate(edges):
        by_layer.setdefault(graph.readers[d].layer, []).append(i)
    done = 0
    for layer in sorted(by_layer):
        idx = by_layer[layer]
        per = max(1, chunk_rows // B)
        for c0 in range(0, len(idx), per):
            chunk = idx[c0:c0 + per]
            us = torch.tensor([edges[i][0] for i in chunk], device=delta.device)
            ds = torch.tensor([edges[i][1] for i in chunk], device=delta.device)
            # rows (edge, pair): the edge's source change at every position
            row_delta = delta[:, :, us].permute(2, 0, 1, 3).reshape(len(chunk) * B, S, -1)
            if positions is not None:  # the change at the edge's own position only
                at = torch.tensor([positions[i] for i in chunk], device=delta.device).repeat_interleave(B)
                keep_pos = torch.arange(S, device=delta.device)[None] == at[:, None]  # [rows, S]
                row_delta = row_delta * keep_pos[:, :, None].to(row_delta.dtype)
            row_target = ds.repeat_interleave(B)
            with torch.no_grad():
                if layer == graph.n_layers:  # into the logits: the final residual plus the change
                    resid = final_resid.repeat(len(chunk), 1, 1) + row_delta.to(final_resid)
                else:
                    hooks = _reader_edit_hooks(graph, layer, row_target, row_delta)
                    with bridge.hooks(fwd_hooks=hooks):
                        resid = runner.run(runner.inputs[layer].repeat(len(chunk), 1, 1), layer)
                out[torch.tensor(chunk, device=out.device)] = metric_rows(runner.logits(resid)).float().reshape(
                    len(chunk), B)
            done += len(chunk)
            if progress is not None:
                progress(done, len(edges))
    return out


# --------------------------------------------------------------------------------------------------------------
# Circuits: every edge outside a circuit ablated
# --------------------------------------------------------------------------------------------------------------
def _writer_groups(graph: EdgeGraph) -> list[tuple[str, int, int]]:
    """(hook, first source index, number of sources) for each writer hook, in source order."""
    groups, i = [(INPUT_HOOK, 0, 1)], 1
    for layer in range(graph.n_layers):
        groups.append((f"blocks.{layer}.attn.hook_result", i, graph.n_heads))
        groups.append((f"blocks.{layer}.hook_mlp_out", i + graph.n_heads, 1))
        i += graph.n_heads + 1
    return groups


def evaluate_circuits(bridge, graph: EdgeGraph, tokens: torch.Tensor, replacement: torch.Tensor,
                      keep: torch.Tensor, metric_rows: Callable, max_rows: int | None = None,
                      progress: Callable | None = None) -> torch.Tensor:
    """The metric of each circuit [K, B]: `keep` [K, n_sources, n_targets] (bool) the edges each circuit keeps
    (at every position), or [K, S, n_sources, n_targets] the edges it keeps at each position; every other edge
    carries `replacement` [B, S, n_sources, D] (the corrupted run's writer outputs, or means) instead of its
    source's live output in this run, into its reader only (at that position). Rows (circuit, pair).

    Exact, not a linear estimate: a reader's input is the sum of its writers' outputs, so it takes
    sum over ablated writers u of (live_u - replacement_u). That sum is a running total over every writer so far
    less the kept edges' terms when a circuit keeps few edges into the reader, or the ablated edges' terms when it
    ablates few: the work is the edges that differ, not every edge of the graph."""
    B, S = tokens.shape
    K = keep.shape[0]
    dev = replacement.device
    per_position = keep.dim() == 4
    keep = keep.bool().cpu() & graph.mask
    ablate = graph.mask & ~keep
    out = torch.empty(K, B, device=dev)
    per = max(1, (max_rows or circuit_rows(graph, bridge, S)) // B)
    groups = _writer_groups(graph)
    group_of = torch.zeros(len(graph.sources), dtype=torch.long)
    for g, (_, i0, count) in enumerate(groups):
        group_of[i0:i0 + count] = g
    for k0 in range(0, K, per):
        ks = list(range(k0, min(K, k0 + per)))
        n_k = len(ks)
        diffs: dict[int, torch.Tensor] = {}  # writer group -> (live - replacement) [n, S, count, D]
        running: dict[int, torch.Tensor] = {}  # writers so far (a count at a group boundary) -> their sum [n, S, D]

        def writer(g, i0, count):
            def hook(t, hook):
                w = t[:, :, None] if t.dim() == 3 else t
                d = (w.reshape(n_k, B, S, count, -1) - replacement[None, :, :, i0:i0 + count].to(w)).reshape(
                    n_k * B, S, count, -1)
                diffs[g] = d
                before = running[i0] if i0 else 0
                running[i0 + count] = before + d.sum(2)
                return t
            return hook

        def reader(js: list[int]):
            m = graph.readers[js[0]].n_sources
            kept, abl = keep[ks][..., :m, js], ablate[ks][..., :m, js]  # [k, (S,) m, J]
            # per circuit, the smaller of its kept and ablated edges into these readers: a circuit that keeps few
            # starts from every writer so far and takes the kept ones away, one that ablates few adds those
            by_kept = kept.flatten(1).sum(1) <= abl.flatten(1).sum(1)  # [k]
            chosen = torch.where(by_kept.view(-1, *[1] * (kept.dim() - 1)), kept, abl)
            # (k, u, j) of the terms; per position, each term's positions [E, S] (a term at some positions only)
            entries = (chosen.any(1) if per_position else chosen).nonzero()
            at = chosen[entries[:, 0], :, entries[:, 1], entries[:, 2]] if per_position else None
            signs = torch.where(by_kept[entries[:, 0]], -1.0, 1.0)
            row_kept = by_kept.repeat_interleave(B)  # [n]

            def hook(x, hook):
                J = len(js)
                if not len(entries) and not bool(by_kept.any()):
                    return x
                fix = running[m][:, :, None] * row_kept.to(x.device, x.dtype)[:, None, None, None]
                fix = fix.expand(-1, -1, J, -1).permute(0, 2, 1, 3).contiguous()  # [n, J, S, D]
                if len(entries):
                    gs = group_of[entries[:, 1]]
                    for g in gs.unique().tolist():
                        sel = gs == g
                        e, sg = entries[sel], signs[sel]
                        i0 = groups[g][1]
                        rows = (e[:, 0:1] * B + torch.arange(B)).reshape(-1)  # each entry's B rows
                        u = (e[:, 1] - i0).repeat_interleave(B)
                        j = e[:, 2].repeat_interleave(B)
                        vals = diffs[g][rows.to(x.device), :, u.to(x.device)]  # [E*B, S, D]
                        weight = sg.repeat_interleave(B).to(vals)[:, None]  # [E*B, 1]: the term's sign
                        if at is not None:  # at its positions only
                            weight = weight * at[sel].repeat_interleave(B, 0).to(vals)
                        vals = vals * weight[:, :, None]
                        fix.index_put_((rows.to(x.device), j.to(x.device)), vals.to(fix.dtype), accumulate=True)
                fix = fix.permute(0, 2, 1, 3)
                return x - (fix if x.dim() == 4 else fix[:, :, 0])
            return hook

        hooks = [(name, writer(g, i0, count)) for g, (name, i0, count) in enumerate(groups)]
        for layer in range(graph.n_layers):
            for kind in ("q", "k", "v", "mlp"):
                js = [j for j in graph.layer_readers(layer) if graph.readers[j].kind == kind]
                name = f"blocks.{layer}.hook_mlp_in" if kind == "mlp" else f"blocks.{layer}.attn.hook_{kind}_input"
                hooks.append((name, reader(js)))
        hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", reader([len(graph.readers) - 1])))
        with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
            logits = bridge(tokens.repeat(n_k, 1), return_type="logits")[:, -1]
        out[ks] = metric_rows(logits).float().reshape(n_k, B)
        if progress is not None:
            progress(ks[-1] + 1, K)
    return out


def reader_owners(graph: EdgeGraph) -> list[list[int]]:
    """The sources each reader feeds: a head's q/k/v reader its head (a shared key/value head every query head of
    its group), an MLP's reader its MLP, the logits none."""
    group = graph.n_heads // graph.n_kv_heads
    out = []
    for r in graph.readers:
        if r.kind == "logits":
            out.append([])
        elif r.kind == "mlp":
            out.append([graph.source_index[r.name]])
        elif r.kind == "q" or group == 1:
            out.append([graph.source_index[f"a{r.layer}.h{r.head}"]])
        else:
            out.append([graph.source_index[f"a{r.layer}.h{h}"] for h in range(r.head * group, (r.head + 1) * group)])
    return out


def on_paths(graph: EdgeGraph, keep: torch.Tensor) -> torch.Tensor:
    """The kept edges [n_sources, n_targets] that lie on a path from `input` to `logits` through kept edges (the
    EAP-IG library's pruning): the graph by position with a single position, where every edge is kept at it."""
    return on_paths_by_position(graph, keep[None])[0]


def on_paths_by_position(graph: EdgeGraph, keep: torch.Tensor) -> torch.Tensor:
    """The kept edges [S, n_sources, n_targets] of a graph by position (u@p -> d@p) that lie on a path from `input`
    to the logits at the last position. Positions meet only inside attention: a head at p reads its query at p
    and its keys and values at every position up to p; an MLP reads its own position; the logits read the last
    position. One pass each way over the sources (in topological order), every position at once."""
    import numpy as np

    k = (keep.bool().cpu() & graph.mask).numpy()  # [S, U, V]
    S, n_src, n_dst = k.shape
    owners = reader_owners(graph)
    kinds = [r.kind for r in graph.readers]
    owned: list[list[int]] = [[] for _ in range(n_src)]
    for j, os_ in enumerate(owners):
        for u in os_:
            owned[u].append(j)
    reached = np.zeros((n_src, S), dtype=bool)
    reached[0] = True  # the input at every position
    for u in range(1, n_src):
        for j in owned[u]:
            into = (k[:, :, j] & reached.T).any(1)  # [S]: reader j at p gets a kept edge from a reached source
            # a head at p reads its keys and values at positions up to p
            reached[u] |= np.maximum.accumulate(into) if kinds[j] in ("k", "v") else into
    useful = np.zeros((n_src, S), dtype=bool)
    reader_useful = np.zeros((n_dst, S), dtype=bool)
    reader_useful[n_dst - 1, S - 1] = True  # the logits, at the last position
    for u in reversed(range(n_src)):
        useful[u] = (k[:, u, :] & reader_useful.T).any(1)
        for j in owned[u]:  # a key or value read at p' serves the head at every p >= p'
            reader_useful[j] |= np.maximum.accumulate(useful[u][::-1])[::-1] if kinds[j] in ("k", "v") else useful[u]
    on = reached & useful  # [U, S]
    target_ok = np.zeros((n_dst, S), dtype=bool)
    target_ok[n_dst - 1, S - 1] = True
    for j, os_ in enumerate(owners):
        if kinds[j] == "logits":
            continue
        mine = on[os_].any(0)
        target_ok[j] = np.maximum.accumulate(mine[::-1])[::-1] if kinds[j] in ("k", "v") else mine
    return torch.from_numpy(k & on.T[:, :, None] & target_ok.T[:, None, :])
