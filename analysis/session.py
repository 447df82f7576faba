"""The model session: the only way a compute reaches a loaded model.

Hooks, `requires_grad` flags and train/eval mode are module state shared by every thread that uses one loaded
model (TransformerLens's `hook_points.py` says so plainly). A session holds the model's lock for as long as it is
open and, on exit (also after an exception), puts all three back as it found them: hooks a compute forgot to
remove are removed, parameters it unfroze are frozen again, a module left in train mode returns to eval.

    with ModelSession(handle) as s:
        logits, cache = s.run_with_cache(tokens, [s.hook("resid_post", 3)])
        with s.frozen():                 # no parameter needs a gradient while training something else on top
            ...

The runner opens the session around a compute; a compute never takes a lock itself.
"""
from __future__ import annotations

import contextlib
import re
import threading
from typing import Iterable, Iterator

import torch

from kernels.grad import requires_grad

from .errors import WorkbenchError
from .models import TORCH_DEFAULTS, ModelHandle, load_model

# hook-point names per site, built in one place (TransformerLens 4 TransformerBridge names)
_SITES = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "z": "blocks.{layer}.attn.hook_z",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
}
OTHER_MODEL_TIMEOUT_S = 600.0  # waiting for a second model (a checkpoint) another run holds


def hook_name(site: str, layer: int) -> str:
    """The hook point of `site` at block `layer`."""
    if site not in _SITES:
        raise ValueError(f"unknown site {site!r}")
    return _SITES[site].format(layer=int(layer))


def resid_after_name(layer: int) -> str:
    """The residual after block `layer`; -1 is the embedding (the residual entering block 0)."""
    return hook_name("resid_pre", 0) if layer == -1 else hook_name("resid_post", layer)


def check_layer(layer: int, n_layers: int, *, what: str = "layer", lowest: int = -1) -> None:
    """One message for a layer outside the model (layers -1, the embedding, to n_layers - 1)."""
    if not lowest <= layer < n_layers:
        low = "-1 (embedding)" if lowest == -1 else str(lowest)
        raise WorkbenchError(f"{what} {layer} does not exist: the model has layers {low} to {n_layers - 1}.")


class _ModuleState:
    """requires_grad of every parameter, training of every module, and the hook registries, of one model (and
    the last forward's tensors a module keeps, let go).

    Only registries that hold something are copied (most are empty), so opening a session costs a fraction of a
    forward (benchmarks/session_overhead.py)."""

    _HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                   "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.params = list({id(p): p for m in modules for p in m._parameters.values() if p is not None}.values())
        self.requires_grad = [p.requires_grad for p in self.params]
        self.training = [m.training for m in modules]
        self.hooks = [{name: set(d) for name in self._HOOK_DICTS if (d := m.__dict__.get(name))} for m in modules]
        self.lens = [(tuple(m.fwd_hooks), tuple(m.bwd_hooks)) if hasattr(m, "fwd_hooks") else None for m in modules]

    def restore(self) -> None:
        for p, flag in zip(self.params, self.requires_grad):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, flag, hooks, lens in zip(self.modules, self.training, self.hooks, self.lens):
            if m.training != flag:
                m.training = flag
            for name in self._HOOK_DICTS:
                registry = m.__dict__.get(name)
                if registry:
                    keep = hooks.get(name, ())
                    for handle_id in [k for k in registry if k not in keep]:
                        del registry[handle_id]
            if lens is not None:
                fwd, bwd = lens
                m.fwd_hooks[:] = [h for h in m.fwd_hooks if any(h is k for k in fwd)]
                m.bwd_hooks[:] = [h for h in m.bwd_hooks if any(h is k for k in bwd)]
            if getattr(m, "_pattern", None) is not None:
                # TransformerLens's attention bridges keep the last forward's pattern; after a run with gradients
                # it holds that run's whole autograd graph (every block's saved tensors) until the next forward
                m._pattern = None


def _all_modules(handle: ModelHandle) -> list[torch.nn.Module]:
    seen: dict[int, torch.nn.Module] = {}
    for root in (handle.bridge, getattr(handle.bridge, "original_model", None)):
        if root is not None:
            for m in root.modules():
                seen.setdefault(id(m), m)
    return list(seen.values())


def module_state(handle: ModelHandle) -> tuple:
    """A comparable snapshot of the shared state a session restores (for tests and checks)."""
    s = _ModuleState(_all_modules(handle))
    return (tuple(s.requires_grad), tuple(s.training),
            tuple(tuple(sorted((k, len(v)) for k, v in h.items())) for h in s.hooks),
            tuple(None if lens is None else (len(lens[0]), len(lens[1])) for lens in s.lens))


class ModelSession:
    """Exclusive use of a loaded model, with its shared state put back on exit. Re-entrant per thread."""

    def __init__(self, handle: ModelHandle, *, timeout_s: float | None = None):
        self.handle = handle
        self._timeout_s = timeout_s
        self._state: _ModuleState | None = None
        self._depth = 0
        self._owner: int | None = None
        self._gates: list = []

    # -- opening and closing ---------------------------------------------------------------------------------
    def __enter__(self) -> "ModelSession":
        lock = self.handle.lock
        self._acquire(lock)
        gate = TORCH_DEFAULTS.computing()  # no model is built (torch's default dtype changed) meanwhile
        try:
            gate.__enter__()
        except BaseException:
            self._release()
            raise
        self._gates.append(gate)
        self._depth += 1
        if self._depth == 1:
            self._owner = threading.get_ident()
            self._state = _ModuleState(_all_modules(self.handle))
        return self

    def _acquire(self, lock, *, forever: bool = False) -> None:
        """Take the model's lock, counted among its waiters meanwhile (so a long run lets this one in)."""
        turns = self.handle.turns
        with turns.cond:
            turns.waiting += 1
        try:
            timeout_s = None if forever else self._timeout_s
            got = lock.acquire() if timeout_s is None else lock.acquire(timeout=timeout_s)
        finally:
            with turns.cond:
                turns.waiting -= 1
                turns.entries += 1
                turns.holds += bool(got)
                turns.cond.notify_all()
        if not got:
            raise WorkbenchError(f"{self.handle.name} is busy with another run.", hint="Try again in a moment.")

    def let_others_in(self, wait_s: float = 60.0) -> None:
        """Call between two independent parts of a long run, where no hook is attached, no flag changed and the
        weights are the model's own: if other runs wait for this model, its state is put back, they get it (the
        first of them, at least), and this run continues after; so a long run holds the model for one part at a
        time, not for its whole length. Cheap when nobody waits."""
        self._check_open()
        turns = self.handle.turns
        if self._depth != 1 or turns.holds != 1 or not turns.waiting:  # held once: a release frees it
            return
        self._state.restore()
        with turns.cond:
            seen = turns.entries
        self._gates.pop().__exit__(None, None, None)
        self._release()
        try:
            with turns.cond:  # until a waiting run took the model (or gave up)
                turns.cond.wait_for(lambda: turns.entries > seen or not turns.waiting, timeout=wait_s)
        finally:
            self._acquire(self.handle.lock, forever=True)  # counted as waiting: another long run lets it back in
            gate = TORCH_DEFAULTS.computing()
            gate.__enter__()
            self._gates.append(gate)
            self._state = _ModuleState(_all_modules(self.handle))

    def __exit__(self, *exc) -> None:
        try:
            if self._depth == 1 and self._state is not None:
                self._state.restore()
                self._state = None
        finally:
            self._depth -= 1
            try:
                self._gates.pop().__exit__(None, None, None)
            finally:
                self._release()

    def _release(self) -> None:
        with self.handle.turns.cond:
            self.handle.turns.holds -= 1
        self.handle.lock.release()

    def _check_open(self) -> None:
        if self._depth == 0 or self._owner != threading.get_ident():
            raise RuntimeError("use the model inside `with ModelSession(handle) as session:`")

    # -- what a compute reads --------------------------------------------------------------------------------
    @property
    def bridge(self):
        """The TransformerBridge, for kernels that drive it directly (only while the session is open)."""
        self._check_open()
        return self.handle.bridge

    @property
    def tokenizer(self):
        return self.handle.tokenizer

    @property
    def summary(self):
        return self.handle.summary

    @property
    def cfg(self):
        return self.handle.bridge.cfg

    @property
    def device(self) -> str:
        return self.handle.device

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def fingerprint(self) -> str:
        return self.handle.fingerprint

    @property
    def n_layers(self) -> int:
        return self.handle.summary.n_layers

    hook = staticmethod(hook_name)
    resid_after = staticmethod(resid_after_name)

    def check_layer(self, layer: int, *, what: str = "layer", lowest: int = -1) -> None:
        check_layer(layer, self.n_layers, what=what, lowest=lowest)

    def tensor(self, ids) -> torch.Tensor:
        """Token ids (one sequence or a list of equal-length ones) as a batch on the model's device."""
        ids = list(ids)
        batch = ids if ids and isinstance(ids[0], (list, tuple)) else [ids]
        return torch.tensor(batch, device=self.device)

    # -- the verbs every analysis needs ----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        self._check_open()
        return self.handle.bridge(tokens, **kwargs)

    def run_with_cache(self, tokens: torch.Tensor, names: Iterable[str]):
        """(logits, cache) with only the named hook points cached."""
        self._check_open()
        names = set(names)
        return self.handle.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks, **kwargs) -> torch.Tensor:
        self._check_open()
        return self.handle.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **kwargs)

    def cache_in_batches(self, seqs: list[list[int]], names, visit, indices=None, batch: int = 64) -> None:
        """Run the sequences (those at `indices`, default all) in batches of one length each, caching the named
        hook points, and call visit(batch indices, cache) for each batch."""
        names = set(names)
        layers = [int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))]
        # only block hook points: stop after the last block they name (no later block, no unembedding over the
        # vocabulary for every position: on a wide vocabulary most of a forward's time)
        stop = max(layers) + 1 if layers and len(layers) == len(names) else None
        with torch.no_grad():
            for idx, toks in same_length_batches(seqs, indices, batch):
                self._check_open()
                _, cache = self.handle.bridge.run_with_cache(toks.to(self.device), names_filter=lambda n: n in names,
                                                             stop_at_layer=stop)
                visit(idx, cache)

    def last_logits(self, seqs: list[list[int]], batch: int = 64, progress=None) -> torch.Tensor:
        """[N, vocab] float32 logits at the last position of each sequence (run in batches of one length);
        `progress(frac, what)` hears of each batch."""
        out = torch.zeros(len(seqs), self.summary.d_vocab)
        done = 0
        with torch.no_grad():
            for idx, toks in same_length_batches(seqs, batch=batch):
                if progress is not None:
                    progress(done / max(1, len(seqs)), f"{done:,} of {len(seqs):,} texts")
                out[idx] = self.forward(toks.to(self.device))[:, -1].float().cpu()
                done += len(idx)
        return out

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """No parameter of the model requires a gradient inside (each gets its flag back after)."""
        with requires_grad(self.bridge.parameters(), False):
            yield

    @contextlib.contextmanager
    def trainable(self, params) -> Iterator[None]:
        """These parameters require a gradient inside (each gets its flag back after)."""
        self._check_open()
        with requires_grad(params, True):
            yield

    @contextlib.contextmanager
    def other(self, name: str, revision: str | None = None, dtype: str | None = None) -> Iterator["ModelSession"]:
        """A session on another model (a training checkpoint), loaded through the model cache; this session's
        model if it is the same one."""
        h = load_model(name, revision=revision, device=self.device, dtype=dtype or self.handle.dtype)
        if h is self.handle:
            yield self
            return
        with ModelSession(h, timeout_s=OTHER_MODEL_TIMEOUT_S) as s:
            yield s


@contextlib.contextmanager
def session_for(model: "ModelHandle | ModelSession") -> Iterator[ModelSession]:
    """The session a function given a model should use: the caller's own (a compute's), or, for a handle (a
    notebook or script calling a library function directly), a new one held for the call."""
    if isinstance(model, ModelSession):
        yield model
        return
    with ModelSession(model) as s:
        yield s


def same_length_batches(seqs, indices=None, batch: int = 64):
    """Yield (indices, token tensor) batches of sequences of one length each (those at `indices`, default all)."""
    by_len: dict[int, list] = {}
    for i in (range(len(seqs)) if indices is None else indices):
        by_len.setdefault(len(seqs[i]), []).append(int(i))
    for group in by_len.values():
        for c in range(0, len(group), batch):
            idx = group[c:c + batch]
            yield idx, torch.tensor([seqs[i] for i in idx])
