"""Switching gradients on or off for a model's parameters and putting each flag back: one helper for the kernels
and the model session (the flags are shared state of a loaded model)."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


@contextlib.contextmanager
def requires_grad(params: Iterable[torch.nn.Parameter], flag: bool) -> Iterator[None]:
    """Set requires_grad on these parameters inside the block; each gets its own flag back after, also after an
    exception."""
    params = list({id(p): p for p in params}.values())
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(flag)
        yield
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


def frozen(module: torch.nn.Module):
    """No parameter of `module` requires a gradient inside the block (weights stay fixed while gradients flow to
    activations)."""
    return requires_grad(module.parameters(), False)
