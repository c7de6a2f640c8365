"""heterospec_ext: fused C++/CUDA kernels for heterogeneity-adaptive tree speculative decoding.

The four ops (each one launch, CPU and CUDA, registered as ``torch.ops.heterospec.*``):

* :func:`draft_topk_entropy` - draft-logit softmax + entropy + top-k
* :func:`stratify`           - cumulative meta-path top-K entropy and stratum policy
* :func:`build_tree`         - top-N subtree, tree mask, positions, sibling lists, paths
* :func:`fused_verify`       - tree acceptance fused with temperature / top-k / top-p

Every op has an ``_out`` twin writing into caller buffers (for CUDA graphs) and a
pure-PyTorch oracle in :mod:`heterospec_ext.reference`.

The decode-layer ops (CPU kernels only; :mod:`heterospec_ext.ops.decode_layer`) fuse the steps
between the GEMMs of a small Llama-style layer at decode sizes: :func:`embed_hidden_rms_norm`,
:func:`fused_add_rms_norm`, :func:`silu_and_mul` and :func:`rope_cache_attention`.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # registers the TORCH_LIBRARY schemas and kernels
from .ops.build_tree import Tree, build_tree, build_tree_out
from .ops.decode_layer import (DECODE_LAYER_DTYPES, embed_hidden_rms_norm, fused_add_rms_norm,
                               rope_cache_attention, silu_and_mul)
from .ops.draft_topk_entropy import DraftTopK, draft_topk_entropy, draft_topk_entropy_out
from .ops.fused_verify import VerifyResult, fused_verify, fused_verify_out
from .ops.stratify import Stratum, make_policy, stratify, stratify_out
from . import reference  # noqa: F401

__version__ = _C.__version__

OPS = ("draft_topk_entropy", "stratify", "build_tree", "fused_verify")
# CPU-only, no _out twins (each returns one new tensor; the caches and the residual are
# written in place through their arguments)
DECODE_LAYER_OPS = ("embed_hidden_rms_norm", "fused_add_rms_norm", "silu_and_mul",
                    "rope_cache_attention")


def build_info() -> dict:
    """How the compiled extension was built: version, CUDA, arch list, torch version."""
    return {
        "version": _C.__version__,
        "with_cuda": bool(_C.with_cuda),
        "cuda_arch_list": [a for a in _C.cuda_arch_list.split(";") if a],
        "built_with_torch": _C.torch_version,
        "running_torch": torch.__version__,
    }


if _C.torch_version.split("+")[0] != torch.__version__.split("+")[0]:
    import warnings

    warnings.warn(
        f"heterospec_ext was built against torch {_C.torch_version} but torch "
        f"{torch.__version__} is running; rebuild with pip install --no-build-isolation .",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "DraftTopK", "Stratum", "Tree", "VerifyResult", "OPS", "build_info",
    "draft_topk_entropy", "draft_topk_entropy_out", "stratify", "stratify_out",
    "make_policy", "build_tree", "build_tree_out", "fused_verify", "fused_verify_out",
    "DECODE_LAYER_OPS", "DECODE_LAYER_DTYPES", "embed_hidden_rms_norm", "fused_add_rms_norm", "silu_and_mul",
    "rope_cache_attention",
]
