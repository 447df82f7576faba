"""Batched activation patching on a TransformerLens 4 `TransformerBridge`.

TransformerLens's `patching` module runs one forward per patch. Here many patches share one forward: each patch
is a group of batch rows (one row per prompt pair), so a sweep over layer x position is a handful of forwards.
A patch at layer l starts from the base run's cached residual entering block l, so blocks 0..l-1 are not
recomputed; under causal attention a patch at position p cannot change positions before p, so those positions
are not recomputed either: the patched rows run only positions p0..P-1 of each block, attending to the base
run's cached keys and values for positions 0..p0-1 (a key/value prefix, through the model's own cache path).
Patches are grouped into forwards by position so that the rows saved outweigh the cost of one more forward.
Only the final position's residual goes through the final norm and the unembedding.

resid_mid, the residual stream between attention and MLP, is patched through the attention output: on the
bridge `blocks.{l}.hook_resid_mid` is an alias of `ln2.hook_in`, so an edit there changes the MLP's input but
not the residual stream the MLP output is added to. Here resid_mid = resid_pre + attn_out, so setting
attn_out := source resid_mid - base resid_pre at the patched position sets the true residual stream, as
TransformerLens's `get_act_patch_resid_mid` does (sequential blocks only: a model whose attention and MLP run in
parallel has no resid_mid). Source dicts key it as `blocks.{l}.hook_resid_mid`; `hook_point` says where it is
applied.

Conventions (the same as `transformer_lens.patching`):
- the *base* run is the run being patched, the *source* cache supplies the patched-in activations; TL's
  functions patch clean activations into the corrupted run (base = corrupted, source = clean);
- a patch index is (layer, pos), (layer, head), (layer, pos, head) or (layer, head, dest_pos), the head axis
  counting key/value heads for k and v under grouped-query attention.

Plain torch; runs on whatever device the bridge is on. No per-patch host synchronisation: results stay on the
device until the sweep ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache

from .readout import residual_logits

# activation name -> (hook name template, index axes after "layer", setter kind)
ACTIVATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("blocks.{l}.hook_resid_pre", ("pos",)),
    "resid_mid": ("blocks.{l}.hook_resid_mid", ("pos",)),  # applied at hook_attn_out (see the module notes)
    "resid_post": ("blocks.{l}.hook_resid_post", ("pos",)),
    "attn_out": ("blocks.{l}.hook_attn_out", ("pos",)),
    "mlp_out": ("blocks.{l}.hook_mlp_out", ("pos",)),
    "z_all_pos": ("blocks.{l}.attn.hook_z", ("head",)),
    "q_all_pos": ("blocks.{l}.attn.hook_q", ("head",)),
    "k_all_pos": ("blocks.{l}.attn.hook_k", ("head",)),
    "v_all_pos": ("blocks.{l}.attn.hook_v", ("head",)),
    "pattern_all_pos": ("blocks.{l}.attn.hook_pattern", ("head",)),
    "z_by_pos": ("blocks.{l}.attn.hook_z", ("pos", "head")),
    "q_by_pos": ("blocks.{l}.attn.hook_q", ("pos", "head")),
    "k_by_pos": ("blocks.{l}.attn.hook_k", ("pos", "head")),
    "v_by_pos": ("blocks.{l}.attn.hook_v", ("pos", "head")),
    "pattern_by_pos": ("blocks.{l}.attn.hook_pattern", ("head", "dest_pos")),
}


def hook_name(activation: str, layer: int) -> str:
    """The name a source dict keys this activation by."""
    return ACTIVATIONS[activation][0].format(l=layer)


def hook_point(activation: str, layer: int) -> str:
    """The hook a patch or a gradient of this activation is taken at."""
    if activation == "resid_mid":
        return f"blocks.{layer}.hook_attn_out"
    return hook_name(activation, layer)


def is_parallel(bridge) -> bool:
    """Attention and MLP read the same residual (GPT-J, NeoX with use_parallel_residual, ...)."""
    return bool(getattr(bridge.cfg, "parallel_attn_mlp", False))


def hook_layers(bridge, activation: str) -> list[int]:
    """The layers whose block has this activation (a convolution or state-space block has no attention, Mamba's
    blocks no MLP; resid_mid is patched through the attention output, and a parallel block has none)."""
    names = bridge.hook_dict
    if activation == "resid_mid" and is_parallel(bridge):
        return []
    return [layer for layer in range(bridge.cfg.n_layers) if hook_point(activation, layer) in names]


def available_activations(bridge) -> tuple[str, ...]:
    """The activations every block of this model has: the ones a sweep over layers can patch."""
    n_layers = bridge.cfg.n_layers
    return tuple(a for a in ACTIVATIONS if len(hook_layers(bridge, a)) == n_layers)


def has_attention_cache(bridge) -> bool:
    """Every block is an attention block (keys and values it can take from a key/value cache): runs over a suffix
    of the positions are possible. Not so for convolution or state-space blocks (LFM2's, Mamba's), whose caches
    are states, not per-position keys."""
    return all(f"blocks.{layer}.attn.hook_k" in bridge.hook_dict for layer in range(bridge.cfg.n_layers))


def index_axes(activation: str) -> tuple[str, ...]:
    return ("layer",) + ACTIVATIONS[activation][1]


def _select(activation: str, idx: tuple[int, ...]):
    """The slice of one prompt-batch activation [B, ...] that a patch index (without layer) replaces."""
    kind = ACTIVATIONS[activation][1]
    if activation.startswith("pattern"):  # [B, H, q, k]
        if kind == ("head",):
            return (slice(None), idx[0])
        return (slice(None), idx[0], idx[1])
    if kind == ("pos",):  # [B, P, d]
        return (slice(None), idx[0])
    if kind == ("head",):  # [B, P, H, dh]
        return (slice(None), slice(None), idx[0])
    return (slice(None), idx[0], idx[1])  # (pos, head)


def axis_sizes(bridge, activation: str, n_pos: int) -> dict[str, int]:
    cfg = bridge.cfg
    heads = cfg.n_heads
    if activation[0] in "kv" and getattr(cfg, "n_key_value_heads", None):
        heads = cfg.n_key_value_heads
    return {"layer": cfg.n_layers, "pos": n_pos, "head": heads, "dest_pos": n_pos}


class BlockRunner:
    """Runs the bridge's blocks from any layer on a given residual, with the bridge's hook points live.

    The arguments each block receives besides the residual (causal mask, position ids, rotary cos/sin, ...)
    are recorded once from a one-row forward of the sequence length and broadcast over any batch size; those laid
    out per (row, head) on their first axis (BLOOM's ALiBi bias [rows x heads, 1, keys]) cannot broadcast and are
    kept for one row and repeated to the batch of each run."""

    PER_ROW_HEAD = ("alibi",)  # keyword arguments laid out [rows x heads, ...]

    def __init__(self, bridge, tokens: torch.Tensor):
        """One plain forward of `tokens` [B, P]: records each block's call, the residual entering it and the
        keys/values each layer's attention cached (for runs over a suffix of the positions)."""
        self.bridge = bridge
        self.tokens = tokens
        self.n_pos = tokens.shape[-1]
        n_rows = tokens.shape[0]
        self._calls: dict[int, tuple[tuple, dict]] = {}
        self._cache_slot: dict[int, int | str] = {}  # layer -> where the block takes its key/value cache
        self.inputs: dict[int, torch.Tensor] = {}  # layer -> residual entering the block [B, P, d]

        n_heads = bridge.cfg.n_heads

        def per_row_head(v):  # [rows x heads, ...] -> one row's [heads, ...]
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n_rows * n_heads:
                return v[:n_heads]
            return v

        def one_row(v):  # unpadded prompts: masks, position ids and rotary tables are the same for every row
            if isinstance(v, Cache):
                return None
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n_rows and n_rows > 1:
                return v[:1]
            if isinstance(v, tuple):
                return tuple(one_row(x) for x in v)
            return v

        handles = []
        for i, block in enumerate(bridge.blocks):
            def record(mod, args, kwargs, i=i):
                self.inputs[i] = args[0].detach()
                for j, a in enumerate(args[1:]):
                    if isinstance(a, Cache):
                        self._cache_slot[i] = j
                for k, v in kwargs.items():
                    if isinstance(v, Cache):
                        self._cache_slot[i] = k
                kw = {k: per_row_head(v) if k in self.PER_ROW_HEAD else one_row(v) for k, v in kwargs.items()}
                if "use_cache" in kw:
                    kw["use_cache"] = False
                self._calls[i] = (tuple(one_row(a) for a in args[1:]), kw)

            handles.append(block.register_forward_pre_hook(record, with_kwargs=True))
        # a key/value cache (for runs over a suffix of the positions) where every block is an attention block;
        # other models (LFM2's convolutions, Mamba) run every position, from their own cacheless forward
        cache = DynamicCache() if has_attention_cache(bridge) else None
        cache_kw = {"past_key_values": cache, "use_cache": True} if cache is not None else {"use_cache": False}
        try:
            with torch.no_grad():
                self.final_logits = bridge(tokens, return_type="logits", **cache_kw)[:, -1]  # [B, d_vocab]
        finally:
            for h in handles:
                h.remove()
        # keys/values per layer [B, kv heads, P, d_head], as the attention stored them (after rotary)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        layers = getattr(cache, "layers", []) if cache is not None else []
        causal = getattr(bridge.cfg, "attention_dir", "causal") == "causal"
        if causal and len(layers) == len(bridge.blocks) and len(self._cache_slot) == len(bridge.blocks):
            for i, layer in enumerate(layers):
                k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
                if not (isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[-2] == self.n_pos):
                    self.kv = {}
                    break
                self.kv[i] = (k.detach(), v.detach())
        self.suffix_ok = bool(self.kv)  # else every run recomputes all positions

    def run(self, resid: torch.Tensor, start_layer: int, stop_layer: int | None = None,
            start_pos: int = 0) -> torch.Tensor:
        """Residual entering block `start_layer` [N, P - start_pos, d] -> residual after block `stop_layer - 1`.

        With `start_pos` > 0 the rows hold positions start_pos..P-1 only; positions before it are the base
        run's (their cached keys and values are attended to), so no row may differ from the base run there."""
        x = resid
        stop = len(self.bridge.blocks) if stop_layer is None else stop_layer
        if start_pos and not self.suffix_ok:
            raise ValueError("this model's blocks cannot run on a suffix of the positions")
        n = x.shape[0]
        for i in range(start_layer, stop):
            args, kwargs = self._calls[i]
            if start_pos:
                args, kwargs = self._suffix_call(i, start_pos, n)
            kwargs = self._batched(kwargs, n)
            out = self.bridge.blocks[i](x, *args, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def _batched(self, kwargs: dict, n_rows: int) -> dict:
        """The recorded keyword arguments with the per-(row, head) ones repeated to `n_rows` rows."""
        if not any(k in kwargs for k in self.PER_ROW_HEAD):
            return kwargs
        heads = self.bridge.cfg.n_heads
        out = dict(kwargs)
        for k in self.PER_ROW_HEAD:
            v = out.get(k)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == heads:
                out[k] = v.repeat(n_rows, *[1] * (v.dim() - 1))
        return out

    def _suffix_call(self, layer: int, p0: int, n_rows: int):
        """The recorded call of block `layer`, cut to query positions p0.. with a key/value prefix 0..p0-1."""
        P = self.n_pos
        rows = n_rows // self.kv[layer][0].shape[0]

        def cut(v, name=""):
            if isinstance(v, tuple):
                return tuple(cut(x, name) for x in v)
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                return v
            if v.dim() >= 3 and v.shape[-1] == P and v.shape[-2] == P:  # [.., query, key] mask
                return v[..., p0:, :]
            if "mask" in name:  # a key-side padding mask keeps every key
                return v
            if v.dim() == 1 and v.shape[0] == P:  # cache_position
                return v[p0:]
            if v.dim() >= 2 and v.shape[1] == P:  # position ids, rotary cos/sin [1, P, ...]
                return v[:, p0:]
            return v

        args, kwargs = self._calls[layer]
        args = tuple(cut(a) for a in args)
        kwargs = {k: cut(v, k) for k, v in kwargs.items()}
        cache = _PrefixCache({i: (k[:, :, :p0].repeat(rows, 1, 1, 1), v[:, :, :p0].repeat(rows, 1, 1, 1))
                              for i, (k, v) in self.kv.items() if i == layer})
        slot = self._cache_slot[layer]
        if isinstance(slot, int):
            args = args[:slot] + (cache,) + args[slot + 1:]
        else:
            kwargs[slot] = cache
        if "use_cache" in kwargs:
            kwargs["use_cache"] = True
        return args, kwargs

    def logits(self, final_resid: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits (final norm, unembedding, its output transform such as Gemma 2's soft-cap) at the
        given positions only (default: the last). [N, d_vocab] or [N, k, V]"""
        if positions is None:
            return residual_logits(self.bridge, final_resid[:, -1:])[:, 0]
        return residual_logits(self.bridge, final_resid[:, positions])


class _PrefixCache(DynamicCache):
    """A read-only key/value prefix: `update` returns the prefix followed by the new keys/values and keeps
    nothing, so one object serves a whole run (and runs never see each other's positions)."""

    def __init__(self, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self._prefix = prefix
        self._len = next(iter(prefix.values()))[0].shape[-2]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self._prefix[layer_idx]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len


def default_chunk_rows(bridge, n_pos: int, budget_bytes: int | None = None) -> int:
    """How many batch rows one forward may take: activations of one block for every row within the budget."""
    cfg = bridge.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    per_row = 4 * n_pos * (6 * cfg.d_model + 2 * d_mlp + 3 * cfg.n_heads * n_pos) + 4 * cfg.d_vocab
    if budget_bytes is None:
        # CPU: small chunks that stay in cache are fastest (measured: 256 rows of the default model run a
        # head-by-position sweep 3.6x faster than 4000 rows). GPU: half the free memory.
        budget_bytes = 32 * 2**20
        device = next(iter(bridge.parameters())).device
        if device.type == "cuda":
            budget_bytes = int(0.5 * torch.cuda.mem_get_info(device)[0])
    return max(1, budget_bytes // per_row)


@dataclass
class SweepResult:
    values: torch.Tensor  # [*index axes, B]: the metric per patch and prompt
    axes: tuple[str, ...]


def activation_patch_sweep(
    runner: BlockRunner,
    source: dict[str, torch.Tensor],
    activation: str,
    metric: Callable[[torch.Tensor], torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    chunk_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    source_tokens: torch.Tensor | None = None,
    suffix: bool = True,
) -> SweepResult:
    """Patch source activations into the base run (the runner's tokens) at every index of `activation`.

    With `source_tokens`, patches that cannot change anything are not run: under causal attention an
    activation at position p depends only on tokens 0..p, so where both runs share that prefix (and, for the
    first block's input, the token itself) the patch is the identity and its value is the base run's.
    With `suffix` (the default, where the model's attention takes a key/value cache) a patch at position p runs
    positions p.. only; patches over all positions run from the first position whose prefix differs.

    `source` maps hook names to the other run's [B, ...] activations (see `source_activations`). `metric`
    takes final-position logits [rows, d_vocab] of rows laid out (patch, prompt) and returns [rows]. Returns
    the metric per patch and prompt. `progress(done, total)` hears of the patches done after every block a wave
    of patched forwards runs (`done` counts a wave's patches in proportion to its blocks run)."""
    bridge = runner.bridge
    n_layers = bridge.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    first = runner.inputs[0]
    B, P = first.shape[0], runner.n_pos
    sizes = axis_sizes(bridge, activation, P)
    axes = index_axes(activation)
    inner = [range(sizes[a]) for a in axes[1:]]
    per_layer = [tuple(ix) for ix in _product(inner)]
    cap = max(1, (chunk_rows or default_chunk_rows(bridge, P)) // B)  # patches per forward
    out = torch.empty((len(layers), *[sizes[a] for a in axes[1:]], B), device=first.device)
    total = len(layers) * len(per_layer)
    done = 0
    pos_axis = next((i for i, a in enumerate(axes[1:]) if a in ("pos", "dest_pos")), None)
    same_prefix = same_token = None
    first_diff = 0  # positions before it have the same prefix in both runs
    if source_tokens is not None:
        equal = (runner.tokens == source_tokens).all(0)  # [P]: same token in every pair
        same_prefix = equal.int().cumprod(0).bool().tolist()
        same_token = equal.tolist()
        first_diff = min(P - 1, sum(same_prefix))
        if pos_axis is not None:
            base_value = metric(runner.final_logits)  # [B]
    if activation == "resid_mid":  # the value to set attn_out to: source resid_mid - the base run's resid_pre
        source = {hook_name(activation, layer): source[hook_name(activation, layer)] - runner.inputs[layer]
                  for layer in layers}
    use_suffix = suffix and runner.suffix_ok
    overhead = _forward_overhead_rows(bridge, P) if use_suffix else 0.0
    chunks = []  # (layer index in `layers`, p0, patch indices)
    for li, layer in enumerate(layers):
        todo = per_layer
        if same_prefix is not None and pos_axis is not None:
            def noop(ix, layer=layer):
                p = ix[pos_axis]
                return same_prefix[p] or (activation == "resid_pre" and layer == 0 and same_token[p])

            skipped = [ix for ix in per_layer if noop(ix)]
            for ix in skipped:
                out[(li, *ix)] = base_value
            todo = [ix for ix in per_layer if not noop(ix)]
            done += len(skipped)
        if use_suffix:
            first_pos = (lambda ix: ix[pos_axis]) if pos_axis is not None else (lambda ix: first_diff)
            planned = plan_chunks([(first_pos(ix), ix) for ix in todo], B, cap, P, overhead)
        else:
            planned = [(0, todo[c:c + cap]) for c in range(0, len(todo), cap)]
        chunks += [(li, p0, idxs) for p0, idxs in planned]
    # Chunks of different layers with the same first position share the blocks after their own: a wave
    # starts with the lowest layer's rows and takes each later layer's rows in as it reaches that layer.
    chunks.sort(key=lambda c: (c[1], layers[c[0]]))
    waves: list[list[tuple]] = []
    for c in chunks:
        w = waves[-1] if waves else None
        if w and w[0][1] == c[1] and sum(len(x[2]) for x in w) + len(c[2]) <= cap:
            w.append(c)
        else:
            waves.append([c])
    for wave in waves:
        n_wave = sum(len(idxs) for _, _, idxs in wave)
        block_done = None if progress is None else (lambda f, d=done, n=n_wave: progress(d + f * n, total))
        vals = _run_wave(runner, source, activation, metric, layers, wave, B, block_done)  # [rows] in wave order
        row = 0
        for li, _, idxs in wave:
            v = vals[row:row + len(idxs) * B].view(len(idxs), B)
            for j, ix in enumerate(idxs):
                out[(li, *ix)] = v[j]
            row += len(idxs) * B
            done += len(idxs)
        if progress is not None:
            progress(done, total)
    return SweepResult(out, axes)


def _run_wave(runner: BlockRunner, source, activation: str, metric, layers, wave, B: int,
              block_done: Callable[[float], None] | None = None) -> torch.Tensor:
    """Run one wave of chunks (one first position p0, ordered by layer): each chunk's rows join the batch at
    their own layer, are patched there, and run on with the rest. Returns the metric per row, in wave order.
    `block_done(f)` is called after each block but the last, f the fraction of the wave's blocks run."""
    bridge = runner.bridge
    p0 = wave[0][1]
    by_layer: dict[int, list[tuple[int, list]]] = {}
    offset = 0
    for li, _, idxs in wave:
        by_layer.setdefault(layers[li], []).append((offset, idxs))
        offset += len(idxs) * B

    def patcher(layer):
        src = source[hook_name(activation, layer)]

        def patch(act, hook=None):
            act = act.clone()
            for o, idxs in by_layer[layer]:
                view = act[o:o + len(idxs) * B].view(len(idxs), B, *act.shape[1:])
                for j, ix in enumerate(idxs):
                    to, frm = _select_shifted(activation, ix, p0)
                    view[j][to] = src[frm]
            return act

        return patch

    last = len(bridge.blocks) - 1
    # The metric reads the final position only, so the last block's MLP runs there alone (its input cut to the
    # last position; the block's residual add broadcasts, and positions before are never read). Not when the
    # patch itself sits on that MLP's output.
    last_mlp_name = f"blocks.{last}.ln2.hook_in"
    cut_last_mlp = last_mlp_name in bridge.hook_dict and not (activation == "mlp_out" and last in by_layer)
    x = None
    first = min(by_layer)
    for i in range(first, len(bridge.blocks)):
        if block_done is not None and i > first:
            block_done((i - first) / (len(bridge.blocks) - first))
        hooks = [(last_mlp_name, _last_position)] if (i == last and cut_last_mlp) else []
        if i in by_layer:
            n_new = sum(len(idxs) for _, idxs in by_layer[i])
            new = runner.inputs[i][:, p0:].repeat(n_new, 1, 1)  # rows (patch, prompt), positions p0..
            x = new if x is None else torch.cat([x, new])
            if activation == "resid_pre":  # the patch is the block's input itself
                x = patcher(i)(x)
            else:
                hooks.append((hook_point(activation, i), patcher(i)))
        if hooks:
            with bridge.hooks(fwd_hooks=hooks):
                x = runner.run(x, i, i + 1, start_pos=p0)
        else:
            x = runner.run(x, i, i + 1, start_pos=p0)
    return metric(runner.logits(x))


def _last_position(act, hook=None):
    return act[:, -1:]


def _select_shifted(activation: str, ix: tuple[int, ...], p0: int):
    """(selection in a run over positions p0.., selection of the same values in a full-length source)."""
    frm = _select(activation, ix)
    if not p0:
        return frm, frm
    kind = ACTIVATIONS[activation][1]
    if activation.startswith("pattern"):  # [B, H, q, k]: the query axis is cut
        if kind == ("head",):
            return (slice(None), ix[0]), (slice(None), ix[0], slice(p0, None))
        return (slice(None), ix[0], ix[1] - p0), frm
    if kind == ("head",):  # [B, P, H, dh]
        return frm, (slice(None), slice(p0, None), ix[0])
    if kind == ("pos",):
        return (slice(None), ix[0] - p0), frm
    return (slice(None), ix[0] - p0, ix[1]), frm


def _forward_overhead_rows(bridge, n_pos: int, gpu_overlap: float = 0.3) -> float:
    """The fixed cost of one more forward (Python and hook dispatch, ~1.5 ms a block), in row-positions of
    compute: how many rows x positions a forward must save before splitting a chunk pays.

    On a GPU the dispatch of one forward overlaps the kernels of the forward before, so only a fraction
    (`gpu_overlap`) of it counts while the sweep is compute-bound."""
    cfg = bridge.cfg
    d, d_mlp = cfg.d_model, getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    flops = 2 * (4 * d * d + 3 * d * d_mlp) + 4 * n_pos * d  # per row-position per block
    param = next(iter(bridge.parameters()))
    if param.device.type == "cuda":  # rough dense throughput, FLOP/s
        throughput = (3e13 if param.dtype == torch.float32 else 1.5e14) * gpu_overlap
    else:
        throughput = 5e10
    return 1.5e-3 * throughput / flops


def plan_chunks(items: list[tuple[int, tuple]], rows_per_patch: int, cap: int, n_pos: int,
                overhead: float) -> list[tuple[int, list[tuple]]]:
    """Group patches (first position they touch, index) into forwards over positions p0..n_pos-1.

    With the patches sorted by position, a forward takes a contiguous run of at most `cap` of them and starts
    at the first one's position. Dynamic programming picks the runs that minimise
    (forwards x `overhead`) + rows x positions computed. O(len(items) x cap), vectorised over the window."""
    import numpy as np

    if not items:
        return []
    items = sorted(items, key=lambda t: t[0])
    fp = np.array([p for p, _ in items], dtype=np.float64)
    n = len(items)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        i = np.arange(max(0, j - cap), j)
        cost = best[i] + overhead + (j - i) * rows_per_patch * (n_pos - fp[i])
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], i[k]
    chunks = []
    j = n
    while j > 0:
        i = int(cut[j])
        chunks.append((items[i][0], [ix for _, ix in items[i:j]]))
        j = i
    return chunks[::-1]


def _product(ranges: Iterable[range]):
    import itertools

    return itertools.product(*ranges)


def source_activations(bridge, tokens: torch.Tensor, activation: str) -> dict[str, torch.Tensor]:
    """The other run's activations that a sweep patches in: block inputs for resid_pre (a plain forward),
    else a cache of just that hook at every layer."""
    n_layers = bridge.cfg.n_layers
    if activation == "resid_pre":
        runner = BlockRunner(bridge, tokens)
        return {hook_name(activation, layer): runner.inputs[layer] for layer in range(n_layers)}
    if activation == "resid_mid":
        if is_parallel(bridge):
            raise ValueError("resid_mid does not exist where attention and MLP run in parallel")
        pre = source_activations(bridge, tokens, "resid_pre")
        attn = source_activations(bridge, tokens, "attn_out")
        return {hook_name(activation, layer): pre[hook_name("resid_pre", layer)] + attn[hook_name("attn_out", layer)]
                for layer in range(n_layers)}
    names = {hook_name(activation, layer) for layer in range(n_layers)}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}
