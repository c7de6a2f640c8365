"""Linear layers with weights pre-packed for the CPU GEMM library (oneDNN for bfloat16, MKL for
float32), for the small row counts of decoding: one AR token, a tree of a few dozen nodes.

``torch.nn.functional.linear`` on CPU re-lays out a bfloat16 weight into oneDNN's blocked format on
every call, which at one to sixteen rows costs more than reading the weight (measured on a 2-core
AMX Xeon: 55 us for a 576x576 bf16 GEMV against 18 us in float32). Packing once at load time
removes that, and lets oneDNN use AMX tiles for the tree forward. Where neither library is
available (non-x86 builds), the plain ``F.linear`` is used; the arithmetic is the same matrix
product either way, only the blocking (and so the float rounding order) differs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# oneDNN / MKL choose their blocking for this many rows; measured best for 1..64-row forwards
# (bench/micro/bench_lean_decode.py).
PACK_ROWS = 16


def _mkldnn_bf16_packing() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _mkl_fp32_packing() -> bool:
    try:
        return bool(torch.backends.mkl.is_available()
                    and hasattr(torch.ops.mkl, "_mkl_linear"))
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """``y = x @ weight.T + bias`` with ``weight`` ``[out, in]`` packed once for CPU.

    ``x`` ``[..., in]`` in ``dtype``; returns ``[..., out]`` in ``dtype``. ``dtype`` is bfloat16 or
    float32 (anything else, or a non-CPU weight, runs ``F.linear`` on the unpacked weight)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 dtype: Optional[torch.dtype] = None):
        dtype = dtype or weight.dtype
        with torch.inference_mode():
            self.weight = weight.detach().to(dtype).contiguous()
            self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.kind = "plain"
        self._packed = None
        if self.weight.device.type == "cpu":
            with torch.inference_mode():
                if dtype == torch.bfloat16 and _mkldnn_bf16_packing():
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACK_ROWS)
                    self.kind = "onednn"
                elif dtype == torch.float32 and _mkl_fp32_packing():
                    self._packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, PACK_ROWS)
                    self.kind = "mkl"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if self.kind == "mkl":
            y = torch.ops.mkl._mkl_linear(x, self._packed, self.weight, self.bias, PACK_ROWS)
            return y
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def fuse(cls, linears, dtype: torch.dtype) -> "PackedLinear":
        """One packed layer computing several ``nn.Linear`` of the same input side by side
        (their outputs concatenated in order): q/k/v, or gate/up."""
        weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [getattr(lin, "bias", None) for lin in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else
                              torch.zeros(lin.weight.shape[0], dtype=lin.weight.dtype,
                                          device=lin.weight.device)
                              for b, lin in zip(biases, linears)])
        return cls(weight, bias, dtype)
