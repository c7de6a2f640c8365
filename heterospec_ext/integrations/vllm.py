"""vLLM V1's chain rejection sampler (``vllm/v1/sample/rejection_sampler.py``) on ``fused_verify``.

vLLM verifies, per step, a chain of ``d_b`` draft tokens per request (``d_b`` may differ and be 0)
against target logits laid out as ``[T + bs, V]``: request b's ``d_b`` draft-position rows, then its
bonus row, requests concatenated (``T = sum d_b``). The output is ``[bs, max_spec_len + 1]`` int32:
the accepted draft tokens, then the recovered (first rejection) or bonus token, then -1.

Here every request becomes a chain tree of ``d_b + 1`` nodes padded to ``max_spec_len + 1`` and
one ``fused_verify`` launch does what vLLM spreads over its sampler (bonus row: temperature, top-k,
top-p, sample), ``apply_sampling_constraints`` (fp32 copy, temperature, sort-based top-k/top-p),
softmax, ``target_argmax``, the recovered-token kernel and the accept kernels. Greedy, sampling
without draft probabilities (n-gram / EAGLE: ``q`` one-hot, accept iff ``u < p(x)``) and with them
(accept iff ``u < p(x) / q(x)``, residual ``max(p - q, 0)``) mix per request, each with its own
temperature, top-k and top-p.

Randomness: one float32 uniform per node (column j tests draft token j, j >= 1) and one for the
final draw (column 0), ``[bs, max_spec_len + 1]``; pass ``uniforms`` or let the function draw them
(requests with a generator in ``sampling_metadata.generators`` draw their row from it). The
accept test uses the same kind of coin as vLLM (one per draft position) with the strict ``u <``
instead of ``>= u``; the recovered and bonus tokens are an inverse-CDF draw over token ids with
the final uniform, where vLLM takes ``argmax(prob / Exponential)`` and its sampler: the same
distributions, different random decisions for the same seed. Greedy results equal vLLM's token for
token (argmax ties go to the lowest id in both).

Not covered: logits processors (penalties, bad words, allowed-token masks, min-tokens, thinking
budgets) - apply them to ``logits`` first; logprobs; vLLM's "synthetic" acceptance mode.
``RejectionSampler.forward`` raises NotImplementedError when ``sampling_metadata`` asks for the
detectable ones.

Host synchronisation: none on CUDA. ``num_draft_tokens`` given as a Python list (vLLM's form) lets
the function skip the row gather when every request drafted ``max_spec_len`` tokens; as a tensor
the rows are always gathered (one copy of ``[bs, max_spec_len + 1, V]`` in the logits' dtype).
"""
from typing import NamedTuple, Optional, Sequence, Union

import torch

import heterospec_ext as hx
from . import _install
from ._checks import check_tensor, check_unit_interval, first_bad, on_host, translate_row_error

PLACEHOLDER_TOKEN_ID = -1
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INTS = (torch.int32, torch.int64)


class SamplerOutput(NamedTuple):
    """vLLM's ``SamplerOutput`` fields, for when vLLM is not installed."""

    sampled_token_ids: torch.Tensor
    logprobs_tensors: Optional[object] = None


def _chain_layout(num_draft_tokens, cu_num_draft_tokens, max_spec_len: int, total: int):
    """Per request ``(d [bs], first draft index [bs])`` as int64 device tensors."""
    cu = cu_num_draft_tokens.to(torch.int64)
    drafts = cu - torch.cat([cu.new_zeros(1), cu[:-1]])
    if isinstance(num_draft_tokens, torch.Tensor):
        check_tensor("num_draft_tokens", num_draft_tokens, dtypes=INTS, shape=cu.shape,
                     device=cu.device)
        listed = num_draft_tokens.tolist() if on_host(num_draft_tokens) else None
    else:
        listed = [int(x) for x in num_draft_tokens]
        if len(listed) != cu.shape[0]:
            raise ValueError(f"num_draft_tokens has {len(listed)} entries, cu_num_draft_tokens "
                             f"{cu.shape[0]}")
    if listed is not None:
        bad = [d for d in listed if not 0 <= d <= max_spec_len]
        if bad:
            raise ValueError(f"num_draft_tokens holds {bad[0]}, outside [0, max_spec_len = "
                             f"{max_spec_len}]")
        if sum(listed) != total:
            raise ValueError(f"num_draft_tokens sums to {sum(listed)}, draft_token_ids holds "
                             f"{total}")
    if on_host(cu) and listed is not None and drafts.tolist() != listed:
        raise ValueError(f"cu_num_draft_tokens {cu.tolist()} is not the running sum of "
                         f"num_draft_tokens {listed}")
    return drafts, cu - drafts, listed


def _sampling_params(sampling_metadata, bs: int, dev):
    """``[bs]`` temperature (0 = greedy), top-k (0 = off) and top-p tensors from vLLM's
    ``SamplingMetadata`` fields ``all_greedy``, ``temperature``, ``top_k``, ``top_p``."""
    temperature = getattr(sampling_metadata, "temperature", None)
    if getattr(sampling_metadata, "all_greedy", False) or temperature is None:
        temperature = torch.zeros(bs, device=dev)
    else:
        check_tensor("sampling_metadata.temperature", temperature, dtypes=FLOATS, shape=(bs,),
                     device=dev)
        # vLLM marks greedy requests with GREEDY_TEMPERATURE: 0 (older releases: -1)
        temperature = torch.where(temperature == -1, 0.0, temperature.to(torch.float32))
    top_k = getattr(sampling_metadata, "top_k", None)
    if top_k is None:
        top_k = torch.zeros(bs, dtype=torch.int64, device=dev)
    else:
        top_k = check_tensor("sampling_metadata.top_k", top_k, dtypes=INTS, shape=(bs,),
                             device=dev).to(torch.int64)
    top_p = getattr(sampling_metadata, "top_p", None)
    if top_p is None:
        top_p = torch.ones(bs, device=dev)
    else:
        top_p = check_tensor("sampling_metadata.top_p", top_p, dtypes=FLOATS, shape=(bs,),
                             device=dev).to(torch.float32)
    return temperature, top_k, top_p


def _draw_uniforms(sampling_metadata, bs: int, nodes: int, dev) -> torch.Tensor:
    """``[bs, nodes]`` float32 uniforms; rows of requests with a generator come from it."""
    uniforms = torch.rand(bs, nodes, device=dev)
    for row, generator in (getattr(sampling_metadata, "generators", None) or {}).items():
        uniforms[row] = torch.rand(nodes, generator=generator, device=dev)
    return uniforms


def rejection_sample(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: Union[Sequence[int], torch.Tensor],
    max_spec_len: int,
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    sampling_metadata,
    *,
    bonus_token_ids: Optional[torch.Tensor] = None,
    uniforms: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Verify every request's draft chain; returns ``[bs, max_spec_len + 1]`` int32, -1 padded.

    Args:
        draft_token_ids: ``[T]`` int32/int64, the drafts of all requests concatenated.
        num_draft_tokens: ``bs`` ints (a list, as vLLM passes it, or a ``[bs]`` tensor), each in
            ``[0, max_spec_len]``.
        max_spec_len: Python int.
        cu_num_draft_tokens: ``[bs]`` int32/int64 running sum of ``num_draft_tokens``.
        draft_probs: None (drafts treated as one-hot: n-gram, EAGLE) or ``[T, V]`` float32, the
            processed draft distribution each draft token was sampled from.
        target_logits: ``[T + bs, V]`` float32/float16/bfloat16 in vLLM's layout (module
            docstring): per request its draft-position rows, then its bonus row. Read in its own
            dtype, after any logits processors.
        sampling_metadata: object with vLLM's ``SamplingMetadata`` fields ``all_greedy``,
            ``temperature`` (``[bs]`` or None; 0 or -1 marks a greedy request), ``top_k``
            (``[bs]`` or None; ``<= 0`` or ``>= V`` disables), ``top_p`` (``[bs]`` or None) and
            ``generators`` (``{request index: torch.Generator}``, used when ``uniforms`` is None).
        bonus_token_ids: optional ``[bs]`` or ``[bs, 1]`` int: when given, a request that accepts
            all its drafts emits this token instead of the bonus drawn from its bonus row (vLLM's
            convention of sampling the bonus outside the rejection sampler).
        uniforms: optional ``[bs, max_spec_len + 1]`` float32 in ``[0, 1)`` (module docstring).

    Invalid input raises ValueError / TypeError naming the argument on CPU; on CUDA a request
    with invalid data emits nothing (its row stays -1), as ``fused_verify`` does.
    """
    dev = target_logits.device if isinstance(target_logits, torch.Tensor) else None
    check_tensor("draft_token_ids", draft_token_ids, dtypes=INTS, shape=(None,), device=dev)
    check_tensor("cu_num_draft_tokens", cu_num_draft_tokens, dtypes=INTS, shape=(None,),
                 device=dev)
    total, bs = draft_token_ids.shape[0], cu_num_draft_tokens.shape[0]
    check_tensor("target_logits", target_logits, dtypes=FLOATS, shape=(total + bs, None))
    vocab, nodes = target_logits.shape[1], int(max_spec_len) + 1
    if max_spec_len < 0 or vocab < 1:
        raise ValueError(f"max_spec_len must be >= 0 and the vocabulary non-empty, got "
                         f"{max_spec_len} and {vocab}")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, dtypes=(torch.float32,), shape=(total, vocab),
                     device=dev)
    drafts, first_draft, listed = _chain_layout(num_draft_tokens, cu_num_draft_tokens,
                                                max_spec_len, total)
    if on_host(draft_token_ids):
        bad = first_bad((draft_token_ids < 0) | (draft_token_ids >= vocab))
        if bad is not None:
            raise ValueError(f"draft_token_ids[{bad[0]}] = {int(draft_token_ids[bad])} is "
                             f"outside [0, {vocab})")

    position = torch.arange(nodes, device=dev)[None, :]
    is_draft = (position >= 1) & (position <= drafts[:, None])
    parents = torch.where(is_draft, position - 1, -1)
    draft_slot = (first_draft[:, None] + position - 1).clamp(0, max(total - 1, 0))
    candidates = torch.where(is_draft, draft_token_ids.to(torch.int64)[draft_slot], -1) \
        if total else torch.full_like(parents, -1)
    first_row = first_draft + torch.arange(bs, device=dev)  # request b's rows start here
    if listed is not None and all(d == max_spec_len for d in listed):
        logits = target_logits.view(bs, nodes, vocab)  # already [bs, nodes, V]: no copy
    else:
        rows = (first_row[:, None] + torch.minimum(position, drafts[:, None]))
        rows = rows.clamp(0, total + bs - 1).reshape(-1)
        logits = target_logits.index_select(0, rows).view(bs, nodes, vocab)
    q = None
    if draft_probs is not None and total:
        q_rows = (first_draft[:, None] + torch.minimum(position, (drafts[:, None] - 1)))
        q = draft_probs.index_select(0, q_rows.clamp(0, total - 1).reshape(-1))
        q = q.view(bs, nodes, vocab)
    if bonus_token_ids is not None:
        check_tensor("bonus_token_ids", bonus_token_ids, dtypes=INTS, device=dev)
        if bonus_token_ids.numel() != bs:
            raise ValueError(f"bonus_token_ids must hold {bs} tokens ([bs] or [bs, 1]), got "
                             f"{list(bonus_token_ids.shape)}")
    temperature, top_k, top_p = _sampling_params(sampling_metadata, bs, dev)
    if uniforms is None:
        uniforms = _draw_uniforms(sampling_metadata, bs, nodes, dev)
    else:
        check_tensor("uniforms", uniforms, dtypes=(torch.float32,), shape=(bs, nodes),
                     device=dev)
        check_unit_interval("uniforms", uniforms)

    def vllm_row(argument, b, v, reason):
        if argument == "draft_probs":
            return f"draft_probs: row {int(first_draft[b]) + v} (request {b}){reason}"
        return (f"target_logits: row {int(first_row[b]) + v} (request {b}, "
                f"{'bonus row' if v == int(drafts[b]) else f'draft position {v}'}){reason}")

    try:
        result = hx.fused_verify(logits, candidates, parents, temperature=temperature,
                                 top_k=top_k, top_p=top_p, uniforms=uniforms, draft_probs=q)
    except ValueError as exc:
        raise translate_row_error(exc, vllm_row) from exc
    out = result.out_tokens.to(torch.int32)
    if bonus_token_ids is not None:
        bonus = bonus_token_ids.reshape(bs, 1).to(torch.int32)
        end = drafts[:, None]
        all_accepted = (result.num_accepted == drafts)[:, None]
        out.scatter_(1, end, torch.where(all_accepted, bonus, out.gather(1, end)))
    return out


def _refuse_unsupported(sampling_metadata) -> None:
    """NotImplementedError for the SamplingMetadata features this sampler does not apply."""
    wanted = []
    if not getattr(sampling_metadata, "no_penalties", True):
        wanted.append("penalties")
    if getattr(sampling_metadata, "bad_words_token_ids", None):
        wanted.append("bad words")
    if getattr(sampling_metadata, "allowed_token_ids_mask", None) is not None:
        wanted.append("allowed_token_ids")
    if getattr(sampling_metadata, "max_num_logprobs", None) is not None:
        wanted.append("logprobs")
    if wanted:
        raise NotImplementedError(
            f"heterospec's RejectionSampler does not apply {', '.join(wanted)}; apply logits "
            f"processors to the logits before verifying, or use vLLM's sampler for these requests")


class RejectionSampler(torch.nn.Module):
    """vLLM V1's ``RejectionSampler`` interface, verifying with ``fused_verify``.

    ``forward(metadata, draft_probs, logits, sampling_metadata)`` takes vLLM's
    ``SpecDecodeMetadata`` (``draft_token_ids``, ``num_draft_tokens``, ``max_spec_len``,
    ``cu_num_draft_tokens``; ``bonus_logits_indices`` is checked on CPU against the layout),
    ``draft_probs`` (``[T, V]`` or None), ``logits`` ``[T + bs, V]`` and ``SamplingMetadata``, and
    returns a ``SamplerOutput`` whose ``sampled_token_ids`` is :func:`rejection_sample`'s output.
    The bonus token is drawn in the same launch, so the ``sampler`` argument is unused.
    """

    def __init__(self, sampler=None, spec_config=None, device=None):
        super().__init__()
        if getattr(spec_config, "rejection_sample_method", None) == "synthetic":
            raise NotImplementedError("heterospec's RejectionSampler has no synthetic mode")
        self.sampler = sampler

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        _refuse_unsupported(sampling_metadata)
        bonus_rows = getattr(metadata, "bonus_logits_indices", None)
        cu = metadata.cu_num_draft_tokens
        if isinstance(bonus_rows, torch.Tensor) and on_host(bonus_rows) and on_host(cu):
            expected = cu.to(torch.int64) + torch.arange(cu.shape[0])
            if not torch.equal(bonus_rows.to(torch.int64), expected):
                raise ValueError(f"metadata.bonus_logits_indices {bonus_rows.tolist()} is not "
                                 f"vLLM's layout (each request's bonus row right after its draft "
                                 f"rows: {expected.tolist()})")
        tokens = rejection_sample(metadata.draft_token_ids, metadata.num_draft_tokens,
                                  metadata.max_spec_len, cu, draft_probs, logits,
                                  sampling_metadata)
        try:
            from vllm.v1.outputs import SamplerOutput as VllmSamplerOutput
        except ImportError:
            return SamplerOutput(tokens, None)
        return VllmSamplerOutput(sampled_token_ids=tokens, logprobs_tensors=None)


def install(module=None) -> _install.Installation:
    """Replace ``vllm.v1.sample.rejection_sampler.RejectionSampler`` (and every already-imported
    ``vllm`` module global bound to it) with :class:`RejectionSampler`.

    Call it before vLLM builds its model runner (which constructs the sampler once). ``module``
    stands in for ``vllm.v1.sample.rejection_sampler`` (tests); without it an absent vLLM raises
    ImportError naming it. ``.uninstall()`` on the result restores vLLM's class.
    """
    module = _install.import_engine(
        "vllm.v1.sample.rejection_sampler", module,
        "install vLLM to use install(); rejection_sample() and RejectionSampler work without it")
    return _install.patch(module, {"RejectionSampler": RejectionSampler}, ("vllm",))
