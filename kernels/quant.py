"""Simulated ("fake") quantization: quantize, then dequantize back to the input's dtype.

A format is named by a short string:

    int{b}-tensor | int{b}-channel | int{b}-g{32,64,128}    symmetric round-to-nearest integers, b in 2..8
    fp8_e4m3-{tensor,channel} | fp8_e5m2-{tensor,channel}  scaled, saturated and cast through torch's float8
    fp4_e2m1-g{16,32}                                      E2M1 values {0, .5, 1, 1.5, 2, 3, 4, 6} x a block scale
    mxfp4                                                  E2M1 in 32-element blocks with a power-of-two scale

Scales: integers s = max|x| / (2^(b-1) - 1), q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1); FP8 s = max|x| /
448 (E4M3, finite max) or / 57344 (E5M2); FP4 s = max|x| / 6; MXFP4 (OCP MX) X = 2^(floor(log2 max|x|) - 2), the
element max's exponent, values saturating at 6. Rounding is to nearest, ties to even.

Blocks: a weight is seen as [out channels, in features]: "tensor" scales all of it at once, "channel" each output
channel, "g<n>" each run of n input features of a channel (padded with zeros when n does not divide the width).
Activations are quantized per token: the last axis is the row (`fake_quant_activation`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP8_DTYPE = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
SCALE_BITS = 16  # a float16 scale per block (MXFP4: an 8-bit exponent)

_PATTERN = re.compile(r"(int([2-8])|fp8_e4m3|fp8_e5m2|fp4_e2m1)-(tensor|channel|g(16|32|64|128))|mxfp4")


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # int | fp8_e4m3 | fp8_e5m2 | fp4_e2m1 | mxfp4
    bits: int
    block: str  # tensor | channel | group
    group: int = 0

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        """Storage cost per element, scales included (a float16 scale per block; MXFP4 an 8-bit exponent)."""
        numel = math.prod(shape)
        if self.block == "tensor":
            blocks = 1
        elif self.block == "channel":
            blocks = shape[0]
        else:
            blocks = shape[0] * math.ceil(math.prod(shape[1:]) / self.group)
        scale = 8 if self.kind == "mxfp4" else SCALE_BITS
        return self.bits + blocks * scale / numel


def parse_format(name: str) -> Format:
    name = name.strip().lower()
    if name == "mxfp4":
        return Format("mxfp4", "mxfp4", 4, "group", 32)
    m = _PATTERN.fullmatch(name)
    if not m:
        raise ValueError(f"unknown format {name!r}: use int{{2..8}}-{{tensor,channel,g32,g64,g128}}, "
                         "fp8_e4m3-{tensor,channel}, fp8_e5m2-{tensor,channel}, fp4_e2m1-g{16,32} or mxfp4")
    kind = "int" if m.group(2) else m.group(1)
    bits = int(m.group(2)) if m.group(2) else {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4}[kind]
    block = m.group(3)
    if kind.startswith("fp8") and block.startswith("g"):
        raise ValueError(f"{name}: FP8 formats are per tensor or per channel")
    if kind == "fp4_e2m1" and not block.startswith("g"):
        raise ValueError(f"{name}: FP4 needs a block scale (g16 or g32)")
    group = int(m.group(4)) if m.group(4) else 0
    return Format(name, kind, bits, "group" if group else block, group)


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """|v| (already scaled, >= 0) to the nearest E2M1 magnitude, ties to the even mantissa, saturating at 6."""
    grid = torch.tensor(E2M1, dtype=v.dtype, device=v.device)
    mids = torch.tensor(_E2M1_MIDS, dtype=v.dtype, device=v.device)
    idx = torch.bucketize(v.contiguous(), mids)  # v == mids[i] -> i (the lower neighbour)
    tie = (idx < len(_E2M1_MIDS)) & (v == mids[idx.clamp(max=len(_E2M1_MIDS) - 1)])
    odd_lower = idx % 2 == 1  # grid[1], grid[3], grid[5], grid[7] have mantissa 1
    idx = torch.where(tie & odd_lower, idx + 1, idx)
    return grid[idx]


def _quant_blocks(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """x [rows, block] in float32: each row is one scaling block."""
    amax = x.abs().amax(-1, keepdim=True)
    if fmt.kind == "int":
        qmax = 2 ** (fmt.bits - 1) - 1
        s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        return torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s
    if fmt.kind in FP8_MAX:
        fmax = FP8_MAX[fmt.kind]
        s = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
        dtype = getattr(torch, FP8_DTYPE[fmt.kind])
        return (x / s).clamp(-fmax, fmax).to(dtype).to(torch.float32) * s
    if fmt.kind == "fp4_e2m1":
        s = torch.where(amax > 0, amax / 6.0, torch.ones_like(amax))
    else:  # mxfp4: the shared power-of-two scale of the OCP MX spec (emax of E2M1 is 2)
        e = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))) - 2
        s = torch.exp2(e)
    v = x / s
    return torch.sign(v) * _round_e2m1(v.abs().clamp(max=6.0)) * s


def fake_quant_2d(w: torch.Tensor, fmt: Format | str) -> torch.Tensor:
    """w [out, in] (rows are output channels) -> quantized-dequantized, same shape and dtype."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    x = w.detach().to(torch.float32)
    rows, cols = x.shape
    if fmt.block == "tensor":
        out = _quant_blocks(x.reshape(1, -1), fmt).reshape(rows, cols)
    elif fmt.block == "channel":
        out = _quant_blocks(x, fmt)
    else:
        g = fmt.group
        pad = (-cols) % g
        xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
        out = _quant_blocks(xp.reshape(-1, g), fmt).reshape(rows, cols + pad)[:, :cols]
    return out.to(w.dtype)


def fake_quant_weight(w: torch.Tensor, fmt: Format | str, out_dim: int = 0) -> torch.Tensor:
    """A weight matrix whose output channels lie along `out_dim` (0 for nn.Linear [out, in], 1 for GPT-2's
    Conv1D [in, out]; embeddings [vocab, d] are treated as one channel per token)."""
    if w.dim() != 2:
        raise ValueError("weights are 2-d matrices")
    if out_dim == 0:
        return fake_quant_2d(w, fmt)
    return fake_quant_2d(w.t(), fmt).t().contiguous()


def fake_quant_activation(x: torch.Tensor, fmt: Format | str) -> torch.Tensor:
    """Per token: each vector along the last axis is a row ("channel" granularity; groups split it further)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    if fmt.block == "tensor":
        fmt = Format(fmt.name, fmt.kind, fmt.bits, "channel")
    shape = x.shape
    return fake_quant_2d(x.reshape(-1, shape[-1]), fmt).reshape(shape)


def squared_error(q: torch.Tensor, w: torch.Tensor) -> float:
    """||q - w||^2, summed in float32 (q a quantized copy of w)."""
    return float((q.detach().float() - w.detach().float()).pow(2).sum())


def sq_error(w: torch.Tensor, fmt: Format | str, out_dim: int = 0) -> float:
    """||Q(W) - W||^2."""
    return squared_error(fake_quant_weight(w.detach(), fmt, out_dim), w)


WEIGHT_FORMATS = tuple([f"int{b}-{g}" for b in (8, 4, 3, 2) for g in ("tensor", "channel", "g32", "g64", "g128")]
                       + ["fp8_e4m3-tensor", "fp8_e4m3-channel", "fp8_e5m2-tensor", "fp8_e5m2-channel",
                          "fp4_e2m1-g16", "fp4_e2m1-g32", "mxfp4"])
