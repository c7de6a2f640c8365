"""Argument checks of the fake (meta) kernels: the metadata checks of ``csrc/*_checks.h``.

The dispatcher sends a call to the fake kernel whenever any argument is a ``meta`` tensor, even
if the others live on the CPU. A fake that checked nothing would then return uninitialised
tensors (and an ``_out`` fake would write nothing) where the real kernel raises. So every fake
checks what the C++ bindings check about devices, ranks, dtypes, sizes and contiguity, with
the same exception types (``RuntimeError``; ``ValueError`` for scalar ranges) and messages that
name the argument. Sizes go through ``torch._check`` so symbolic shapes under ``torch.compile``
become guards, never host reads of data.
"""
import ctypes
import math
from typing import Optional, Sequence, Tuple

import torch

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    t: torch.Tensor,
    name: str,
    *,
    dim: int,
    dtypes: Sequence[torch.dtype],
    sizes: Sequence[Tuple[int, object]] = (),
    same_device_as: Optional[Tuple[torch.Tensor, str]] = None,
    contiguous: bool = False,
) -> None:
    """Raise ``RuntimeError`` naming ``name`` unless ``t`` has rank ``dim``, a dtype in
    ``dtypes``, ``t.size(d) == n`` for each ``(d, n)`` in ``sizes``, the device of
    ``same_device_as = (tensor, its name)`` and (if asked) a contiguous layout."""
    torch._check(t.dim() == dim,
                 lambda: f"{name} must be a {dim}-D tensor, got {t.dim()}-D with shape "
                         f"{list(t.shape)}")
    torch._check(t.dtype in dtypes,
                 lambda: f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    for d, n in sizes:
        torch._check(t.size(d) == n,
                     lambda: f"{name}.size({d}) must be {n}, got {t.size(d)} "
                             f"(shape {list(t.shape)})")
    if same_device_as is not None:
        other, other_name = same_device_as
        torch._check(t.device == other.device,
                     lambda: f"{name} and {other_name} must be on the same device, got "
                             f"{t.device} and {other.device}")
    if contiguous:
        torch._check(t.is_contiguous(), lambda: f"{name} must be contiguous")


def as_float32(value: float) -> float:
    """``value`` rounded to float32 as C++'s ``static_cast<float>`` does (inf on overflow,
    0 on underflow), without creating a tensor (fakes run under a fake-tensor mode)."""
    return ctypes.c_float(value).value


def check_positive_temperature(temperature) -> None:
    """draft_topk_entropy's temperature: finite and > 0, also once rounded to float32."""
    if not isinstance(temperature, (int, float)):
        return  # a symbolic float: the real kernel checks it when it runs
    t32 = as_float32(temperature)
    torch._check_value(
        math.isfinite(temperature) and t32 > 0.0 and math.isfinite(t32),
        lambda: f"temperature must be a finite number > 0 (also as float32), got "
                f"{temperature!r}")
