"""From a residual to logits the way the model itself does: final norm, unembedding, then the model's own
post-unembedding transform (Gemma 2's final soft-cap `cap * tanh(z / cap)`, Cohere's logit scale, Granite's
logits scaling, Falcon-H1's multiplier, ...), as TransformerLens's architecture adapter declares it
(`apply_output_logits_transform`, the transform the bridge's own forward applies).

Every analysis that decodes a residual outside the model's own forward (the lenses, patched forwards, entropy,
quantisation's partial runs) goes through here, so a patch that changes nothing gives the model's own output.

Plain torch; the transform is element-wise on the logits, so blockwise kernels (kernels.lens) apply it per block.
"""
from __future__ import annotations

from typing import Callable

import torch

LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def output_transform(bridge) -> LogitTransform | None:
    """The model's element-wise transform of the unembedding's output, or None where it has none (the usual case:
    logits are the unembedding's output, and callers may use that it is affine in the normalised residual)."""
    adapter = getattr(bridge, "adapter", None)
    fn = getattr(adapter, "apply_output_logits_transform", None)
    if not callable(fn):
        cap = getattr(getattr(bridge, "cfg", None), "output_logits_soft_cap", None)
        return _softcap(float(cap)) if cap is not None and cap > 0 else None
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    overridden = getattr(type(adapter), "apply_output_logits_transform", None) is not \
        ArchitectureAdapter.apply_output_logits_transform
    cap = getattr(bridge.cfg, "output_logits_soft_cap", None)
    if not overridden and not (cap is not None and cap > 0):
        return None
    return fn


def _softcap(cap: float) -> LogitTransform:
    return lambda z: cap * torch.tanh(z / cap)


def transform_logits(bridge, logits: torch.Tensor) -> torch.Tensor:
    """The unembedding's output [.., V] -> the model's logits."""
    fn = output_transform(bridge)
    return logits if fn is None else fn(logits)


def _in_model_dtype(bridge, x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype of the model's weights: a lens trained or computed in float32 reads out through a bfloat16
    or float16 model's own norm and unembedding (autograd carries gradients back through the cast)."""
    weight = getattr(getattr(bridge.unembed, "original_component", None), "weight", None)
    return x if weight is None or x.dtype == weight.dtype else x.to(weight.dtype)


def residual_logits(bridge, resid: torch.Tensor) -> torch.Tensor:
    """A residual [.., d] (as it leaves the last block) -> the model's logits [.., V]: the final norm recomputed on
    it, the unembedding and the model's output transform."""
    return unembed_logits(bridge, bridge.ln_final(_in_model_dtype(bridge, resid)))


def unembed_logits(bridge, normed: torch.Tensor) -> torch.Tensor:
    """A normalised residual [.., d] (after the final norm, or a lens's stand-in for it) -> the model's logits."""
    return transform_logits(bridge, bridge.unembed(_in_model_dtype(bridge, normed)))
