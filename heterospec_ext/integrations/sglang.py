"""SGLang's speculative-kernel interface (sgl-kernel) computed by heterospec's ops.

Per EAGLE step SGLang calls three sgl-kernel functions; this module provides each with the same
argument names, shapes and dtypes, writing its outputs in place, on CPU and CUDA:

* :func:`build_tree_kernel_efficient` - tree mask (three modes), positions and the retrieve /
  first-child / next-sibling arrays from SGLang's top-k selection, via ``build_tree``;
* :func:`verify_tree_greedy` - greedy acceptance from the target's argmax, via ``fused_verify``;
* :func:`tree_speculative_sampling_target_only` - sampling acceptance from fp32 probabilities,
  via ``fused_verify``; only the lossless thresholds (1.0, 1.0) are accepted.

Beyond the drop-ins:

* :func:`tree_speculative_sampling_from_logits` replaces SGLang's ``softmax`` ->
  ``top_k_renorm_prob`` -> ``top_p_renorm_prob`` -> verify sequence with one ``fused_verify``
  launch that reads the target logits in their own dtype, with per-request temperature
  (0 = greedy), top-k and top-p;
* :func:`draft_pool`, :func:`stratify_pool` and :func:`build_tree_per_request` give every request
  its own number of draft tokens (HeteroSpec's strata) in SGLang's tree format, padded to a fixed
  batch maximum so CUDA-graph shapes stay fixed;
* :func:`install` swaps the three drop-ins into ``sgl_kernel``.

Coins. SGLang draws ``uniform_samples [bs, n]`` (the coin of node v decides among v's children:
sibling i is accepted iff ``coin <= p(x_1) + ... + p(x_i)``) and
``uniform_samples_for_final_sampling [bs]``. fused_verify tests each child with its own uniform
against the renormalised residual. The adapter gives node c the coin of the node whose link
reaches it: ``uniform_samples[b, parent]`` for a first child, ``uniform_samples[b, previous
sibling]`` otherwise; the final coin is the final draw.
Along one walk every coin is read at most once (a node's coin tests either its first child, if it
was accepted, or its next sibling, if it was rejected), so the result is exact in distribution.
Decisions equal SGLang's for the first child of every node and for the final draw (inverse CDF
over token ids of the same residual); a later sibling is decided by a fresh coin where SGLang
reuses the parent's coin against the cumulative sum, so the same coins can pick different
siblings with the same probabilities.

Where behaviour differs from SGLang (documented in README "Engine integrations"):

* a coin of exactly 0 never accepts a zero-probability token (SGLang tests ``coin <= S``);
* duplicate sibling tokens are tested once (SGLang adds their probability twice, accepting that
  token with up to twice its target probability);
* thresholds other than 1.0 raise ``ValueError`` (SGLang's are lossy below 1);
* ``accept_index`` is rewritten whole (-1 after the accepted path; SGLang leaves the caller's
  fill); ``predicts`` is written only at the rows of accepted nodes, as SGLang does;
* ``draft_probs`` (dropped from newer sgl-kernel releases) is neither read nor written;
* malformed input raises ``ValueError`` / ``TypeError`` naming the argument on CPU; on CUDA (no
  host syncs) a malformed request accepts nothing and writes no ``predicts`` (``accept_index``
  row all -1, ``accept_token_num`` 0), where SGLang's kernels read out of bounds or loop.

Host synchronisation: none on CUDA, except ``FULL_MASK`` mode, which reads ``sum(seq_lens)`` once
to check the buffer size (that layout's size depends on the data; use ``QLEN_ONLY`` under CUDA
graphs). CPU inputs are validated on the host, which costs no synchronisation there.
"""
from typing import NamedTuple, Sequence

import torch

import heterospec_ext as hx
from . import _install
from ._checks import check_tensor, check_unit_interval, first_bad, on_host, translate_row_error
from ._linked_tree import LinkedTree, describe_defect, read_linked_tree

FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2  # SGLang's TreeMaskMode

I32, I64, F32 = (torch.int32,), (torch.int64,), (torch.float32,)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INTS = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------- verify: shared parts


def _check_verify_args(predicts, accept_index, accept_token_num, candidates, retrive_index,
                       retrive_next_token, retrive_next_sibling):
    """Shapes/dtypes of the arguments every verify function shares; returns ``(bs, n)``."""
    check_tensor("candidates", candidates, dtypes=I64, shape=(None, None))
    bs, n = candidates.shape
    dev = candidates.device
    if n < 1:
        raise ValueError("candidates must have at least one column (the root)")
    check_tensor("predicts", predicts, dtypes=I32, shape=(bs * n,), device=dev)
    check_tensor("accept_index", accept_index, dtypes=I32, shape=(bs, None), device=dev)
    if accept_index.shape[1] < 1:
        raise ValueError("accept_index needs at least one column (the root)")
    check_tensor("accept_token_num", accept_token_num, dtypes=I32, shape=(bs,), device=dev)
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", retrive_next_token),
                    ("retrive_next_sibling", retrive_next_sibling)):
        check_tensor(name, t, dtypes=I64, shape=(bs, n), device=dev)
    return bs, n


def _retrive_index_valid(retrive_index: torch.Tensor) -> torch.Tensor:
    """[bs] bool: every entry lies in [0, bs*n) (it indexes ``predicts`` and the flattened
    ``target_predict``) and no value repeats in the batch (each node needs its own row)."""
    rows = retrive_index.numel()
    in_range = (retrive_index >= 0) & (retrive_index < rows)
    slot = torch.where(in_range, retrive_index, rows)
    uses = torch.zeros(rows + 1, dtype=torch.int64, device=retrive_index.device)
    uses.scatter_add_(0, slot.reshape(-1), torch.ones_like(slot.reshape(-1)))
    repeated = uses.gather(0, slot.reshape(-1)).view_as(slot) > 1
    if on_host(retrive_index):
        bad = first_bad(~in_range)
        if bad is not None:
            raise ValueError(f"retrive_index{list(bad)} = {int(retrive_index[bad])} is outside "
                             f"[0, {rows}): it indexes predicts (and target_predict)")
        bad = first_bad(in_range & repeated)
        if bad is not None:
            value = int(retrive_index[bad])
            where = [list(map(int, p)) for p in (retrive_index == value).nonzero()[:2]]
            raise ValueError(f"retrive_index{where[0]} and retrive_index{where[1]} both hold "
                             f"{value}: every node needs its own row of predicts")
    return (in_range & ~repeated).all(1)


def _read_tree(retrive_next_token, retrive_next_sibling, retrive_index, accept_index,
               parent_first: bool = False):
    """The engine tree renumbered for fused_verify, and the parents the op gets: a request with
    malformed links or indices (or, with ``parent_first``, any numbering other than parent-first)
    gets ``parents[b, 0] = 0``, which the op answers with an empty result. On CPU malformed input
    raises instead."""
    tree = read_linked_tree(retrive_next_token, retrive_next_sibling,
                            max_depth=accept_index.shape[1] - 1)
    host = on_host(retrive_next_token)
    if host and not bool(tree.well_formed.all()):
        b = int((~tree.well_formed).nonzero()[0, 0])
        raise ValueError(describe_defect(retrive_next_token[b].tolist(),
                                         retrive_next_sibling[b].tolist(), b))
    valid = tree.well_formed & _retrive_index_valid(retrive_index)
    if parent_first:
        identity = (tree.order == torch.arange(tree.order.shape[1], device=tree.order.device))
        numbered = identity.all(1)
        if host and not bool(numbered.all()):
            b = int((~numbered).nonzero()[0, 0])
            raise ValueError(f"retrive_next_token / retrive_next_sibling: request {b} is not "
                             f"numbered parent-first (a link points to a lower slot), but "
                             f"parent_first=True promised it")
        valid = valid & numbered
    parents = tree.parents.clone()
    parents[:, :1] = torch.where(valid, -1, 0)[:, None]
    return tree, parents


def _tokens_in_tree_order(candidates: torch.Tensor, tree: LinkedTree, vocab: int) -> torch.Tensor:
    """Candidates renumbered; on CPU every in-tree non-root token must lie in [0, vocab)."""
    if on_host(candidates):
        real = tree.in_tree.clone()
        real[:, :1] = False
        bad = first_bad(real & ((candidates < 0) | (candidates >= vocab)))
        if bad is not None:
            raise ValueError(f"candidates{list(bad)} = {int(candidates[bad])} is outside "
                             f"[0, {vocab}) (the vocabulary of the target rows)")
    return candidates.gather(1, tree.order)


def _rows_in_tree_order(rows: torch.Tensor, order: torch.Tensor,
                        parent_first: bool = False) -> torch.Tensor:
    """``rows[b, order[b, j]]`` as ``[bs, n, V]``. No copy with ``parent_first`` (the caller has
    emptied requests that break it) or, on CPU, when the numbering is the identity (free to test
    there); otherwise CUDA copies, since testing would sync the host."""
    bs, n, vocab = rows.shape
    if parent_first or (on_host(order) and torch.equal(order, torch.arange(n).expand(bs, n))):
        return rows
    flat = order + torch.arange(bs, device=order.device)[:, None] * n
    return rows.reshape(bs * n, vocab).index_select(0, flat.reshape(-1)).view(bs, n, vocab)


def _log_probs(probs: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``log(probs)`` (0 -> -inf, negative or NaN -> NaN). On CPU, log(0) takes a slow path
    (several times a dense log, and top-k renormalised rows are mostly zeros), so zeros are
    logged as ones and filled with -inf afterwards."""
    if not on_host(probs):
        return probs.log_() if in_place else probs.log()
    zero = probs == 0
    return torch.where(zero, 1.0, probs).log_().masked_fill_(zero, float("-inf"))


def _node_uniforms(uniform_samples, final_samples, tree: LinkedTree) -> torch.Tensor:
    """fused_verify's ``[bs, n]`` uniforms from SGLang's coins (module docstring): our node j gets
    the coin of the engine node whose link reaches it; column 0 is the final draw."""
    predecessor = tree.predecessor.gather(1, tree.order)
    linked = tree.in_tree.gather(1, tree.order) & (predecessor >= 0)
    coins = torch.where(linked, uniform_samples.gather(1, predecessor.clamp_min(0)), 0.0)
    coins[:, :1] = final_samples[:, None]
    return coins.contiguous()


def _write_verdict(result, tree: LinkedTree, retrive_index, emitted, predicts, accept_index,
                   accept_token_num) -> None:
    """SGLang's outputs from a ``fused_verify`` result over our numbering: ``accept_index[b, j]``
    = retrive_index of the j-th accepted node (root first, -1 after), ``accept_token_num[b]`` =
    accepted draft tokens, ``predicts[retrive_index of accepted node j] = emitted[b, j]`` (the
    token emitted after that node). Other ``predicts`` rows keep their values."""
    accepted = result.accepted_nodes
    bs, n = accepted.shape
    is_node = accepted >= 0
    engine_node = tree.order.gather(1, accepted.clamp_min(0))
    flat = torch.where(is_node, retrive_index.gather(1, engine_node), -1)
    width = accept_index.shape[1]
    if width > n:
        flat_row = torch.cat([flat, flat.new_full((bs, width - n), -1)], 1)
    else:
        flat_row = flat[:, :width]  # the depth cap keeps accepted paths within `width`
    accept_index.copy_(flat_row)
    accept_token_num.copy_(result.num_accepted)
    # Scatter through a staging copy with one spare slot, so unused entries need no masking.
    spare = predicts.numel()
    staging = torch.cat([predicts, predicts.new_zeros(1)])
    staging.scatter_(0, torch.where(is_node, flat, spare).reshape(-1),
                     emitted.reshape(-1).to(predicts.dtype))
    predicts.copy_(staging[:spare])


def _require_lossless(threshold_single: float, threshold_acc: float) -> None:
    if threshold_single != 1.0 or threshold_acc != 1.0:
        raise ValueError(
            f"threshold_single = {threshold_single}, threshold_acc = {threshold_acc}: heterospec "
            f"verifies losslessly only (SGLang's other thresholds accept tokens more often than "
            f"the target samples them); pass 1.0 for both")


# ----------------------------------------------------------------------------- verify: drop-ins


def verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, retrive_index,
                       retrive_next_token, retrive_next_sibling, target_predict) -> None:
    """sgl-kernel's ``verify_tree_greedy``: accept, level by level, the first sibling whose token
    equals the target's prediction after its parent.

    Args (``bs`` requests, ``n = draft_token_num`` nodes each, ``S = num_spec_step``):
        predicts: ``[bs * n]`` int32, written in place at the ``retrive_index`` rows of accepted
            nodes: the token emitted after that node (the target's prediction).
        accept_index: ``[bs, S]`` int32, written: ``retrive_index`` of the root and the accepted
            nodes, then -1. At most ``S - 1`` tokens are accepted (nodes deeper are ignored).
        accept_token_num: ``[bs]`` int32, written: accepted draft tokens (root and bonus excluded).
        candidates: ``[bs, n]`` int64 token of each node (the root's is unused).
        retrive_index: ``[bs, n]`` int64, distinct values in ``[0, bs * n)``: the flat row of each
            node in ``predicts`` and in ``target_predict``.
        retrive_next_token / retrive_next_sibling: ``[bs, n]`` int64 first child / next sibling
            (-1 none) over node slots; any numbering, root at slot 0.
        target_predict: ``[bs, n]`` int64; ``target_predict.flatten()[retrive_index[b, v]]`` is the
            target's greedy token after node v.

    Computed by ``fused_verify`` at temperature 0 on a per-request score table: row v scores 1 for
    every node whose token equals v's prediction, so its argmax (lowest index on ties) is the first
    such node and the walk accepts exactly the sibling SGLang accepts.
    """
    bs, n = _check_verify_args(predicts, accept_index, accept_token_num, candidates,
                               retrive_index, retrive_next_token, retrive_next_sibling)
    check_tensor("target_predict", target_predict, dtypes=I64, shape=(bs, n),
                 device=candidates.device)
    tree, parents = _read_tree(retrive_next_token, retrive_next_sibling, retrive_index,
                               accept_index)
    safe_index = retrive_index.clamp(0, max(bs * n - 1, 0))
    predicted = target_predict.reshape(-1)[safe_index].gather(1, tree.order)
    tokens = candidates.gather(1, tree.order)
    # Node j's "token" becomes the lowest node index holding the same token, so equal tokens
    # compare equal; row v's argmax is the lowest index whose token equals v's prediction, and
    # column n (0.5) wins only when no node holds it.
    same = tokens[:, :, None] == tokens[:, None, :]
    token_ids = same.to(torch.int32).argmax(-1).to(torch.int64)
    scores = (predicted[:, :, None] == tokens[:, None, :]).to(torch.float32)
    scores = torch.cat([scores, scores.new_full((bs, n, 1), 0.5)], -1)
    result = hx.fused_verify(scores, token_ids, parents, temperature=0.0,
                             uniforms=scores.new_zeros(bs, n))
    emitted = predicted.gather(1, result.accepted_nodes.clamp_min(0))
    _write_verdict(result, tree, retrive_index, emitted, predicts, accept_index, accept_token_num)


def _check_coins(uniform_samples, uniform_samples_for_final_sampling, bs, n, dev) -> None:
    check_tensor("uniform_samples", uniform_samples, dtypes=F32, shape=(bs, n), device=dev)
    check_tensor("uniform_samples_for_final_sampling", uniform_samples_for_final_sampling,
                 dtypes=F32, shape=(bs,), device=dev)
    check_unit_interval("uniform_samples", uniform_samples)
    check_unit_interval("uniform_samples_for_final_sampling", uniform_samples_for_final_sampling)


def tree_speculative_sampling_target_only(
    predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
    retrive_next_sibling, uniform_samples, uniform_samples_for_final_sampling, target_probs,
    draft_probs=None, threshold_single: float = 1.0, threshold_acc: float = 1.0,
    deterministic: bool = True, *, parent_first: bool = False,
) -> None:
    """sgl-kernel's ``tree_speculative_sampling_target_only`` with thresholds 1.0 (lossless).

    Args: as :func:`verify_tree_greedy` for the outputs and the tree, plus
        uniform_samples: ``[bs, n]`` float32 in ``[0, 1)``: SGLang's coin of each node (mapped
            as the module docstring explains).
        uniform_samples_for_final_sampling: ``[bs]`` float32 in ``[0, 1)``: the final draw.
        target_probs: ``[bs, n, V]`` float32; row ``[b, v]`` (node slot v, not ``retrive_index``) is
            the target distribution after node v. Rows of in-tree nodes must be finite and
            ``>= 0``; they are renormalised (``fused_verify`` reads ``log(target_probs)``).
        draft_probs: ignored (SGLang's scratch buffer; newer releases dropped it).
        threshold_single, threshold_acc: must both be 1.0.
        deterministic: ignored (heterospec's results never depend on thread scheduling).
        parent_first: promise that every link points to a higher slot (SGLang's tree builders
            guarantee it): on CUDA the rows are then read in place instead of copied into
            fused_verify's numbering; a request breaking the promise raises on CPU and accepts
            nothing on CUDA.

    Emitted tokens are distributed exactly as sampling from ``target_probs`` token by token.
    """
    _require_lossless(threshold_single, threshold_acc)
    bs, n = _check_verify_args(predicts, accept_index, accept_token_num, candidates,
                               retrive_index, retrive_next_token, retrive_next_sibling)
    dev = candidates.device
    _check_coins(uniform_samples, uniform_samples_for_final_sampling, bs, n, dev)
    check_tensor("target_probs", target_probs, dtypes=F32, shape=(bs, n, None), device=dev)
    if target_probs.shape[2] < 1:
        raise ValueError("target_probs needs a vocabulary of at least one token")
    tree, parents = _read_tree(retrive_next_token, retrive_next_sibling, retrive_index,
                               accept_index, parent_first)
    tokens = _tokens_in_tree_order(candidates, tree, target_probs.shape[2])
    rows = _rows_in_tree_order(target_probs, tree.order, parent_first)
    logits = _log_probs(rows, in_place=rows is not target_probs)
    try:
        result = hx.fused_verify(logits, tokens, parents, temperature=1.0,
                                 uniforms=_node_uniforms(uniform_samples,
                                                         uniform_samples_for_final_sampling, tree))
    except ValueError as exc:
        raise translate_row_error(exc, lambda _arg, b, v, _reason: (
            f"target_probs: request {b} node {int(tree.order[b, v])}: the row must hold finite "
            f"probabilities >= 0 with a positive sum")) from exc
    _write_verdict(result, tree, retrive_index, result.out_tokens, predicts, accept_index,
                   accept_token_num)


def tree_speculative_sampling_from_logits(
    predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
    retrive_next_sibling, uniform_samples, uniform_samples_for_final_sampling, target_logits,
    temperatures, top_ks, top_ps, *, parent_first: bool = False,
) -> None:
    """SGLang's ``softmax -> top_k_renorm_prob -> top_p_renorm_prob -> tree verify`` in one
    ``fused_verify`` launch over the target logits, per request greedy or sampled.

    Args: the outputs, tree and coins of :func:`tree_speculative_sampling_target_only`, plus
        target_logits: ``[bs * n, V]`` (SGLang's ``next_token_logits``) or ``[bs, n, V]``, float32 /
            float16 / bfloat16, node-slot order, read in its own dtype.
        temperatures: ``[bs]`` or ``[bs, 1]`` float, finite and ``>= 0``; 0 makes that request
            greedy (SGLang's greedy requests, temperature 1 with top-k 1, give the same tokens).
        top_ks: ``[bs]`` int32/int64; ``<= 0`` or ``>= V`` disables (SGLang passes ``1 << 30``).
        top_ps: ``[bs]`` float in ``(0, 1]``.
        parent_first: as :func:`tree_speculative_sampling_target_only` (no row copy on CUDA).

    Processing is fused_verify's (temperature, then top-k keeping boundary ties, softmax, then
    top-p keeping boundary ties), applied identically to acceptance, residual and bonus. It
    differs from FlashInfer's renorm kernels only in which of several tokens tied at a top-k /
    top-p boundary survive. Greedy requests follow :func:`verify_tree_greedy` on ``argmax`` of
    their rows (lowest id on ties). The tree's numbering is applied to the rows with one copy on
    CUDA unless ``parent_first`` (none on CPU when the numbering is already parent-first).
    """
    bs, n = _check_verify_args(predicts, accept_index, accept_token_num, candidates,
                               retrive_index, retrive_next_token, retrive_next_sibling)
    dev = candidates.device
    _check_coins(uniform_samples, uniform_samples_for_final_sampling, bs, n, dev)
    check_tensor("target_logits", target_logits, dtypes=FLOATS, device=dev)
    if target_logits.dim() == 2 and target_logits.shape[0] == bs * n:
        target_logits = target_logits.view(bs, n, target_logits.shape[1])
    check_tensor("target_logits", target_logits, dtypes=FLOATS, shape=(bs, n, None))
    vocab = target_logits.shape[2]
    temperature = check_tensor("temperatures", temperatures, dtypes=FLOATS, device=dev)
    if temperature.numel() != bs or temperature.dim() not in (1, 2):
        raise ValueError(f"temperatures must have shape [{bs}] or [{bs}, 1], got "
                         f"{list(temperature.shape)}")
    temperature = temperature.reshape(bs).to(torch.float32)
    top_k = check_tensor("top_ks", top_ks, dtypes=INTS, shape=(bs,), device=dev).to(torch.int64)
    top_p = check_tensor("top_ps", top_ps, dtypes=FLOATS, shape=(bs,), device=dev)
    top_p = top_p.to(torch.float32)
    if on_host(temperature):
        bad = first_bad(~((temperature >= 0) & torch.isfinite(temperature)))
        if bad is not None:
            raise ValueError(f"temperatures[{bad[0]}] = {float(temperature[bad])} must be "
                             f"finite and >= 0")
        bad = first_bad(~((top_p > 0) & (top_p <= 1)))
        if bad is not None:
            raise ValueError(f"top_ps[{bad[0]}] = {float(top_p[bad])} must lie in (0, 1]")
    tree, parents = _read_tree(retrive_next_token, retrive_next_sibling, retrive_index,
                               accept_index, parent_first)
    tokens = _tokens_in_tree_order(candidates, tree, vocab)
    try:
        result = hx.fused_verify(
            _rows_in_tree_order(target_logits, tree.order, parent_first), tokens, parents,
            temperature=temperature, top_k=top_k, top_p=top_p,
            uniforms=_node_uniforms(uniform_samples, uniform_samples_for_final_sampling, tree))
    except ValueError as exc:
        raise translate_row_error(exc, lambda _arg, b, v, reason: (
            f"target_logits: request {b} node {int(tree.order[b, v])}{reason}")) from exc
    _write_verdict(result, tree, retrive_index, result.out_tokens, predicts, accept_index,
                   accept_token_num)


# ----------------------------------------------------------------------------- tree building


def _packed_width(n: int) -> int:
    """Bytes per row of a QLEN_ONLY_BITPACKING mask, as SGLang sizes them."""
    if n > 32:
        raise ValueError(f"QLEN_ONLY_BITPACKING holds at most 32 nodes, draft_token_num = {n}")
    return 1 if n <= 8 else (2 if n <= 16 else 4)


def _check_tree_mask(tree_mask, mode: int, bs: int, n: int, seq_lens: torch.Tensor) -> None:
    """The layout of ``mode`` (see :func:`_write_tree_mask`); FULL_MASK reads ``sum(seq_lens)``."""
    dev = seq_lens.device
    if mode == FULL_MASK:
        check_tensor("tree_mask", tree_mask, dtypes=(torch.bool,), shape=(None,), device=dev)
        total = n * n * bs + n * int(seq_lens.sum())  # the one host read (size depends on data)
        if tree_mask.numel() != total:
            raise ValueError(f"tree_mask must hold sum(verified_seq_len) * {n} + {bs} * {n}^2 = "
                             f"{total} entries in FULL_MASK mode, got {tree_mask.numel()}")
    elif mode == QLEN_ONLY:
        check_tensor("tree_mask", tree_mask, dtypes=(torch.bool,), shape=(bs * n * n,),
                     device=dev)
    elif mode == QLEN_ONLY_BITPACKING:
        dtypes = {1: (torch.uint8, torch.int8), 2: (torch.uint16, torch.int16),
                  4: (torch.uint32, torch.int32)}[_packed_width(n)]
        check_tensor("tree_mask", tree_mask, dtypes=dtypes, shape=(bs * n,), device=dev)
        if not tree_mask.is_contiguous():
            raise ValueError("tree_mask must be contiguous in QLEN_ONLY_BITPACKING mode")
    else:
        raise ValueError(f"tree_mask_mode must be FULL_MASK (0), QLEN_ONLY (1) or "
                         f"QLEN_ONLY_BITPACKING (2), got {mode}")


def _write_tree_mask(tree_mask: torch.Tensor, mode: int, tree: "hx.Tree",
                     seq_lens: torch.Tensor) -> None:
    """SGLang's tree mask from ``build_tree``'s ancestor-or-self mask, in ``mode``'s layout
    (checked by :func:`_check_tree_mask`):

    FULL_MASK: bool, per request ``n x (seq_len + n)`` row-major, requests concatenated; only the
        ``n`` tree columns of each row are written (SGLang's caller fills the prefix with True).
    QLEN_ONLY: bool ``[bs * n * n]``.
    QLEN_ONLY_BITPACKING: ``[bs * n]`` of 1, 2 or 4-byte integers (``n <= 8``, ``<= 16``,
        ``<= 32``): bit j (little-endian) of row i is ``mask[i, j]``.
    """
    bs, n = tree.depth.shape
    if mode == FULL_MASK:
        nodes = torch.arange(n, device=seq_lens.device)
        start = n * (n * torch.arange(bs, device=seq_lens.device)
                     + torch.cumsum(seq_lens, 0) - seq_lens)
        seq = seq_lens[:, None, None]
        index = (start[:, None, None] + (seq + n) * nodes[None, :, None] + seq
                 + nodes[None, None, :])
        tree_mask[index.reshape(-1)] = tree.mask.reshape(-1)
    elif mode == QLEN_ONLY:
        tree_mask.copy_(tree.mask.reshape(-1))
    else:
        width = _packed_width(n)
        words = tree.packed_mask[:, :, 0].reshape(bs * n, 1).to(torch.int64)
        shifts = 8 * torch.arange(width, device=words.device)
        tree_mask.view(torch.uint8).view(bs * n, width).copy_((words >> shifts) & 0xFF)


def _write_tree_outputs(tree, seq_lens, tree_mask, tree_mask_mode, positions, retrive_index,
                        retrive_next_token, retrive_next_sibling) -> None:
    bs, n = tree.depth.shape
    _write_tree_mask(tree_mask, tree_mask_mode, tree, seq_lens)
    positions.copy_((seq_lens[:, None] + tree.depth).reshape(-1))
    retrive_index.copy_(torch.arange(bs * n, device=seq_lens.device).view(bs, n))
    retrive_next_token.copy_(tree.first_child)
    retrive_next_sibling.copy_(tree.next_sibling)


def _selection_parents(parent_list, selected_index, topk: int) -> torch.Tensor:
    """``[bs, n]`` parents (build_tree's pool convention) of the root plus the selected nodes.

    Selected node i (1-based) has score index ``s = selected_index[b, i - 1]``; its parent is the
    root when ``s // topk == 0``, else the selected node whose score index is
    ``parent_list[b, s // topk]``. A request whose selection is malformed gets ``parents[b, 0] =
    0``, which ``build_tree`` answers with an empty tree on CUDA; CPU raises.
    """
    bs, picked = selected_index.shape
    if picked == 0:  # a root-only tree
        return torch.full((bs, 1), -1, dtype=torch.int64, device=selected_index.device)
    rows = parent_list.shape[1]
    row = torch.div(selected_index, topk, rounding_mode="floor")
    in_range = (selected_index >= 0) & (selected_index < topk * rows)
    parent_score = parent_list.gather(1, row.clamp(0, rows - 1))
    match = selected_index[:, None, :] == parent_score[:, :, None]  # [bs, child, candidate]
    found = match.any(-1)
    position = match.to(torch.int32).argmax(-1).to(torch.int64) + 1
    parents = torch.where(row == 0, 0, torch.where(found, position, -1))
    ascending = torch.ones_like(in_range)
    ascending[:, 1:] = selected_index[:, 1:] > selected_index[:, :-1]
    node_ok = in_range & ascending & ((row == 0) | found)
    if on_host(selected_index):
        bad = first_bad(~in_range)
        if bad is not None:
            raise ValueError(f"selected_index{list(bad)} = {int(selected_index[bad])} is outside "
                             f"[0, topk * parent_list.shape[1]) = [0, {topk * rows})")
        bad = first_bad(~ascending)
        if bad is not None:
            raise ValueError(f"selected_index[{bad[0]}] must be strictly ascending (SGLang sorts "
                             f"the top-k score indices); position {bad[1]} is not")
        bad = first_bad(~node_ok)
        if bad is not None:
            raise ValueError(
                f"selected_index[{bad[0]}, {bad[1]}] = {int(selected_index[bad])}: its parent "
                f"(score index {int(parent_score[bad])}) is not selected. SGLang drops such a "
                f"node with an 'invalid eagle tree' warning; NaN draft scores cause it")
    root = torch.where(node_ok.all(1), -1, 0)[:, None]
    return torch.cat([root, parents], 1)


def build_tree_kernel_efficient(parent_list, selected_index, verified_seq_len, tree_mask,
                                positions, retrive_index, retrive_next_token, retrive_next_sibling,
                                topk: int, depth: int, draft_token_num: int,
                                tree_mask_mode: int) -> None:
    """sgl-kernel's ``build_tree_kernel_efficient``, computed by ``build_tree``.

    Args (``n = draft_token_num``):
        parent_list: ``[bs, topk * (depth - 1) + 1]`` int64: for score row r (score index
            ``s // topk``), the score index of that row's parent node (row 0: the root).
        selected_index: ``[bs, n - 1]`` int64, strictly ascending score indices of the draft nodes
            (``topk(scores, n - 1)`` sorted, as ``build_tree_kernel_efficient_preprocess`` does).
        verified_seq_len: ``[bs]`` int64 committed length of each request.
        tree_mask: written, layout by ``tree_mask_mode`` (FULL_MASK 0, QLEN_ONLY 1,
            QLEN_ONLY_BITPACKING 2; see ``_write_tree_mask``). Row i: the root, node i and its
            ancestors.
        positions: ``[bs * n]`` int64, written: ``verified_seq_len[b] + depth``.
        retrive_index: ``[bs, n]`` int64, written: ``b * n + i``.
        retrive_next_token / retrive_next_sibling: ``[bs, n]`` int64, written: first child / next
            sibling in increasing node index (-1 none); every entry is written, so no -1 prefill is
            needed.
        topk, depth, draft_token_num, tree_mask_mode: ints, as SGLang passes them.

    Node i >= 1 is ``selected_index[b, i - 1]``; node 0 the root. A selected node whose parent is
    not selected raises on CPU; on CUDA the request becomes a root-only tree (SGLang drops the node
    with a printed warning and reads past the selection when it computes that node's position).
    """
    n = int(draft_token_num)
    if n < 1 or topk < 1 or depth < 1:
        raise ValueError(f"draft_token_num, topk and depth must be >= 1, got {n}, {topk}, {depth}")
    check_tensor("verified_seq_len", verified_seq_len, dtypes=I64, shape=(None,))
    bs, dev = verified_seq_len.shape[0], verified_seq_len.device
    check_tensor("parent_list", parent_list, dtypes=I64, shape=(bs, topk * (depth - 1) + 1),
                 device=dev)
    check_tensor("selected_index", selected_index, dtypes=I64, shape=(bs, n - 1), device=dev)
    check_tensor("positions", positions, dtypes=I64, shape=(bs * n,), device=dev)
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", retrive_next_token),
                    ("retrive_next_sibling", retrive_next_sibling)):
        check_tensor(name, t, dtypes=I64, shape=(bs, n), device=dev)
    _check_tree_mask(tree_mask, tree_mask_mode, bs, n, verified_seq_len)
    pool_parents = _selection_parents(parent_list, selected_index, topk)
    tree = hx.build_tree(pool_parents, torch.zeros(bs, n, device=dev),
                         torch.zeros(bs, n, dtype=torch.int64, device=dev),
                         torch.full((bs,), n, dtype=torch.int64, device=dev), n)
    _write_tree_outputs(tree, verified_seq_len, tree_mask, tree_mask_mode, positions,
                        retrive_index, retrive_next_token, retrive_next_sibling)


# ----------------------------------------------------------------------------- per-request budgets


class DraftPool(NamedTuple):
    """SGLang's EAGLE draft results as a ``build_tree`` / ``stratify`` pool: ``[bs, 1 + F]``,
    node 0 the root, node ``s + 1`` the draft token with score index s
    (``F = topk + (depth - 1) * topk^2``)."""

    parents: torch.Tensor  # int64, -1 for the root
    scores: torch.Tensor  # float32 cumulative path probability (root 1)
    tokens: torch.Tensor  # int64, root = verified_id
    level: torch.Tensor  # int64 draft step that produced the node (root -1)


def draft_pool(verified_id: torch.Tensor, score_list: Sequence[torch.Tensor],
               token_list: Sequence[torch.Tensor],
               parents_list: Sequence[torch.Tensor]) -> DraftPool:
    """Convert the lists SGLang's EAGLE worker collects (``build_tree_kernel_efficient`` in
    ``build_eagle_tree.py`` takes the same) into a pool.

    Args:
        verified_id: ``[bs]`` int tokens (the roots).
        score_list: ``depth`` tensors ``[bs, 1, topk]`` then ``[bs, topk, topk]``, float cumulative
            path probabilities.
        token_list: ``depth`` tensors ``[bs, topk]`` then ``[bs, topk * topk]`` int token ids.
        parents_list: ``depth`` tensors ``[bs, topk + 1]`` then ``[bs, topk]`` int: per score row,
            the score index of the row's parent (-1 / row 0: the root); the last one is unused.
    """
    if not score_list or len(score_list) != len(token_list) or \
            len(score_list) != len(parents_list):
        raise ValueError("score_list, token_list and parents_list must be non-empty lists of the "
                         "same length (one entry per draft step)")
    scores = torch.cat([s.flatten(1) for s in score_list], 1).to(torch.float32)
    tokens = torch.cat(list(token_list), 1).to(torch.int64)
    bs, count = scores.shape
    topk = score_list[0].shape[-1]
    dev = scores.device
    check_tensor("verified_id", verified_id, dtypes=INTS, shape=(bs,), device=dev)
    if tokens.shape != scores.shape:
        raise ValueError(f"token_list holds {list(tokens.shape)} tokens for {list(scores.shape)} "
                         f"scores")
    rows = count // topk
    parent_rows = torch.cat([p.to(torch.int64) for p in parents_list[:-1]], 1) \
        if len(parents_list) > 1 else torch.full((bs, 1), -1, dtype=torch.int64, device=dev)
    if parent_rows.shape[1] < rows:
        raise ValueError(f"parents_list covers {parent_rows.shape[1]} score rows, scores need "
                         f"{rows}")
    row_of = torch.arange(count, device=dev) // topk
    parent_score = parent_rows[:, row_of]
    parents = torch.where(row_of == 0, 0, parent_score + 1)
    if on_host(parents):
        bad = first_bad((row_of > 0) & ((parent_score < 0) | (parent_score >= torch.arange(
            count, device=dev))))
        if bad is not None:
            raise ValueError(f"parents_list: request {bad[0]}: score index {bad[1]} has parent "
                             f"score index {int(parent_score[bad])}, not an earlier draft token")
    level = torch.where(row_of == 0, 0, 1 + (torch.arange(count, device=dev) - topk)
                        // (topk * topk))
    cat0 = lambda first, rest: torch.cat([first, rest], 1)  # noqa: E731
    return DraftPool(
        parents=cat0(torch.full((bs, 1), -1, dtype=torch.int64, device=dev), parents),
        scores=cat0(torch.ones(bs, 1, device=dev), scores),
        tokens=cat0(verified_id.to(torch.int64)[:, None], tokens),
        level=cat0(torch.full((bs, 1), -1, dtype=torch.int64, device=dev),
                   level.expand(bs, count)),
    )


def stratify_pool(pool: DraftPool, row_entropy: torch.Tensor, topk: int,
                  thresholds: torch.Tensor, policy: torch.Tensor) -> "hx.Stratum":
    """HeteroSpec's stratum of every request from its draft pool (``hx.stratify``).

    Args:
        pool: from :func:`draft_pool`.
        row_entropy: ``[bs, 1 + topk * (depth - 1)]`` float32, one entry per score row in
            ``parent_list``'s layout: the renormalised top-k entropy of the draft distribution the
            row's top-k was taken from (``draft_topk_entropy(...).topk_entropy``).
        topk: SGLang's ``topk`` (children per score row).
        thresholds, policy: as :func:`heterospec_ext.stratify` (``policy[:, 1]`` counts the root).

    P* is the deepest-level node with the highest own draft probability (score over its parent's
    score), H(P*) the sum of the row entropies along its path. Feed ``.top_n`` to
    :func:`build_tree_per_request`; ``.extra_depth`` asks the engine for that many more draft steps
    (then rebuild the pool) before the tree is built.
    """
    bs, nodes = pool.parents.shape
    if topk < 1 or (nodes - 1) % topk:
        raise ValueError(f"topk = {topk} does not divide the pool's {nodes - 1} draft tokens")
    check_tensor("row_entropy", row_entropy, dtypes=F32, shape=(bs, (nodes - 1) // topk),
                 device=pool.parents.device)
    row_of = torch.arange(nodes - 1, device=row_entropy.device) // topk
    step_entropy = torch.cat([row_entropy.new_zeros(bs, 1), row_entropy[:, row_of]], 1)
    own = pool.scores.log() - pool.scores.gather(1, pool.parents.clamp_min(0)).log()
    deepest = pool.level == pool.level.max()
    confidence = torch.where(deepest & (pool.parents >= 0), own, float("-inf"))
    return hx.stratify(step_entropy, confidence, pool.parents, thresholds, policy)


class SGLangTree(NamedTuple):
    """What SGLang's ``build_tree_kernel_efficient`` (python) returns, padded to ``n_max`` nodes
    per request, plus the per-request node count."""

    tree_mask: torch.Tensor  # layout by mode, see _write_tree_mask (padding rows: self only)
    positions: torch.Tensor  # [bs * n_max] int64 seq_len + depth (padding: seq_len)
    retrive_index: torch.Tensor  # [bs, n_max] int64 b * n_max + i
    retrive_next_token: torch.Tensor  # [bs, n_max] int64 (-1 on padding)
    retrive_next_sibling: torch.Tensor  # [bs, n_max] int64 (-1 on padding)
    draft_tokens: torch.Tensor  # [bs * n_max] int64 (padding: the root's token, a valid id)
    num_draft_tokens: torch.Tensor  # [bs] int64 real nodes including the root


def build_tree_per_request(pool: DraftPool, num_draft_tokens: torch.Tensor, n_max: int,
                           seq_lens: torch.Tensor, tree_mask_mode: int = QLEN_ONLY) -> SGLangTree:
    """SGLang's tree outputs with a per-request node budget, padded to ``n_max`` (fixed shapes).

    Args:
        pool: from :func:`draft_pool`.
        num_draft_tokens: ``[bs]`` int64 nodes to verify per request, root included (e.g.
            ``stratify_pool(...).top_n``); clamped to ``[1, min(n_max, pool nodes)]``.
        n_max: node slots per request (a Python int, e.g. ``int(policy[:, 1].max())``).
        seq_lens: ``[bs]`` int64 committed lengths.
        tree_mask_mode: FULL_MASK, QLEN_ONLY (default, fixed size) or QLEN_ONLY_BITPACKING.

    The selection is ``build_tree``'s best-first top-N by score, which for SGLang's monotone
    cumulative scores is ``topk(scores, N - 1)``, so with every budget equal to SGLang's
    ``num_verify_tokens`` the outputs equal SGLang's. Padding slots carry no links, so the verify
    functions never visit them; the engine still runs them through the target (their mask rows
    attend to themselves only).
    """
    check_tensor("num_draft_tokens", num_draft_tokens, dtypes=INTS,
                 shape=(pool.parents.shape[0],), device=pool.parents.device)
    check_tensor("seq_lens", seq_lens, dtypes=I64, shape=(pool.parents.shape[0],),
                 device=pool.parents.device)
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    bs, dev = seq_lens.shape[0], seq_lens.device
    if tree_mask_mode == FULL_MASK:  # the prefix columns stay True
        tree_mask = torch.ones(n_max * n_max * bs + n_max * int(seq_lens.sum()), dtype=torch.bool,
                               device=dev)
    elif tree_mask_mode == QLEN_ONLY_BITPACKING:
        dtype = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32}[_packed_width(n_max)]
        tree_mask = torch.zeros(bs * n_max, dtype=dtype, device=dev)
    elif tree_mask_mode == QLEN_ONLY:
        tree_mask = torch.ones(bs * n_max * n_max, dtype=torch.bool, device=dev)
    else:
        _check_tree_mask(None, tree_mask_mode, bs, n_max, seq_lens)  # raises: unknown mode
    tree = hx.build_tree(pool.parents, pool.scores, pool.tokens,
                         num_draft_tokens.to(torch.int64), n_max)
    positions = torch.empty(bs * n_max, dtype=torch.int64, device=dev)
    links = torch.empty(3, bs, n_max, dtype=torch.int64, device=dev)
    _write_tree_outputs(tree, seq_lens, tree_mask, tree_mask_mode, positions, links[0], links[1],
                        links[2])
    draft_tokens = torch.where(tree.tokens >= 0, tree.tokens, pool.tokens[:, :1])
    return SGLangTree(tree_mask, positions, links[0], links[1], links[2],
                      draft_tokens.reshape(-1), tree.num_nodes)


# ----------------------------------------------------------------------------- install


DROP_INS = ("build_tree_kernel_efficient", "verify_tree_greedy",
            "tree_speculative_sampling_target_only")


def install(module=None) -> _install.Installation:
    """Replace sgl-kernel's three speculative functions with this module's.

    Sets ``sgl_kernel.<name>`` for each of :data:`DROP_INS` and rebinds every already-imported
    ``sglang`` / ``sgl_kernel`` module global that refers to the original function (SGLang binds
    them at import: ``from sgl_kernel import build_tree_kernel_efficient as ...``). Call it once in
    the server process before the first request (a launcher's ``sitecustomize`` works). Returns an
    :class:`~heterospec_ext.integrations._install.Installation`; ``.uninstall()`` restores SGLang's
    functions. ``module`` stands in for ``sgl_kernel`` (tests); without it an absent
    ``sgl_kernel`` raises ImportError naming it.
    """
    module = _install.import_engine(
        "sgl_kernel", module, "install SGLang's kernels (pip install sgl-kernel) to use install(); "
        "the functions of heterospec_ext.integrations.sglang work without it")
    return _install.patch(module, {name: globals()[name] for name in DROP_INS},
                          ("sglang", "sgl_kernel"))
