"""Argument checks for the engine adapters: every message names the engine's argument.

Shapes and dtypes are checked on every device (they are host metadata). Values are checked only
for CPU tensors, where reading them costs no device synchronisation; on CUDA the adapters instead
hand malformed requests to the op in a form it answers with an empty result.
"""
import re
from typing import Iterable, Optional, Sequence

import torch


def on_host(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s values can be read without a device synchronisation."""
    return tensor.device.type == "cpu"


def check_tensor(name: str, value, *, dtypes: Iterable[torch.dtype],
                 shape: Optional[Sequence[Optional[int]]] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Raise TypeError (not a tensor / wrong dtype) or ValueError (shape / device) naming ``name``.

    ``shape`` entries of ``None`` match any size; ``device`` is compared by type and index.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    dtypes = tuple(dtypes)
    if value.dtype not in dtypes:
        wanted = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {wanted}, got "
                        f"{str(value.dtype).replace('torch.', '')}")
    if shape is not None:
        ok = value.dim() == len(shape) and all(
            want is None or want == got for want, got in zip(shape, value.shape))
        if not ok:
            wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {wanted}, got {list(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, the other arguments on {device}")
    return value


def first_bad(mask: torch.Tensor):
    """Index tuple of the first True entry of a CPU bool tensor, or None."""
    hits = mask.nonzero()
    return None if hits.numel() == 0 else tuple(int(i) for i in hits[0])


def check_unit_interval(name: str, values: torch.Tensor) -> None:
    """CPU only: every value must lie in [0, 1), as the op's uniforms must."""
    if on_host(values):
        bad = first_bad(~((values >= 0) & (values < 1)))
        if bad is not None:
            raise ValueError(f"{name}{list(bad)} = {float(values[bad])} must lie in [0, 1)")


_OP_ROW_ERROR = re.compile(r"^(target_logits|draft_probs): request (\d+) node (\d+)(.*)$", re.S)


def translate_row_error(error: ValueError, describe) -> ValueError:
    """Rewrite fused_verify's "``target_logits: request b node v<reason>``" errors (our node
    numbering) as ``describe(argument, b, v, reason) -> str``, naming the engine's argument and
    row; other errors pass through unchanged."""
    match = _OP_ROW_ERROR.match(str(error))
    if match is None:
        return error
    argument, b, v, reason = match.group(1), int(match.group(2)), int(match.group(3)), \
        match.group(4)
    return ValueError(describe(argument, b, v, reason))
