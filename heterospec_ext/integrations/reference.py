"""Float64 oracles of the engines' documented semantics, as plain per-request loops.

* SGLang (sgl-kernel ``csrc/speculative``): ``build_tree_kernel_efficient`` (every mask mode),
  ``verify_tree_greedy`` and ``tree_speculative_sampling_target_only`` at thresholds 1.0. The
  sampling walk has two coin rules: ``"sglang"`` (one coin per node for all its children,
  ``coin <= cumulative probability``, duplicates counted twice) and ``"heterospec"`` (the adapter's
  documented mapping: a child is tested with the coin of the node whose link reaches it, against
  the renormalised residual, strict ``<``, duplicates skipped).
* vLLM V1 ``rejection_sample``: greedy prefix match, ``p(x) / q(x) >= u`` acceptance, recovered
  token from ``max(p - q, 0)`` (or p without the draft token), bonus from the bonus row. The
  recovered and bonus draws use the inverse CDF with the request's final uniform, the adapter's
  documented coin mapping (vLLM's own draws use other random numbers).

Inputs are CPU tensors; outputs are python lists. Valid inputs only: the adapters' error paths are
tested separately. Processed target distributions come from
:func:`heterospec_ext.reference._fv_target_probs` (temperature, top-k, top-p in float64).
"""
from typing import List, Optional

import torch

from heterospec_ext.reference import _fv_inverse_cdf as inverse_cdf
from heterospec_ext.reference import _fv_target_probs as processed_probs

FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2


# ----------------------------------------------------------------------------- SGLang: build tree


def sglang_build_tree(parent_list, selected_index, verified_seq_len, topk: int,
                      draft_token_num: int, tree_mask_mode: int):
    """``build_tree_kernel_efficient`` on a valid selection (every selected node's parent
    selected). Returns ``(tree_mask, positions, retrive_index, next_token, next_sibling)`` as lists:
    the mask flat in the mode's layout (FULL_MASK prefix columns True, packed rows as ints)."""
    n = draft_token_num
    bs = len(verified_seq_len)
    parent_list, selected = parent_list.tolist(), selected_index.tolist()
    seq_lens = [int(s) for s in verified_seq_len.tolist()]
    positions, retrive_index, next_token, next_sibling, masks = [], [], [], [], []
    for b in range(bs):
        sel = selected[b]

        def parent_of(node):  # node >= 1; the root is 0
            row = sel[node - 1] // topk
            if row == 0:
                return 0
            return sel.index(parent_list[b][row]) + 1

        nt, ns = [-1] * n, [-1] * n
        for i in range(n - 1, 0, -1):  # the kernel's order: later nodes end up after earlier
            p = parent_of(i)
            if nt[p] != -1:
                ns[i] = nt[p]
            nt[p] = i
        rows = []
        for i in range(n):
            row, v = [False] * n, i
            row[0] = True
            while v != 0:
                row[v] = True
                v = parent_of(v)
            rows.append(row)
        positions += [seq_lens[b] + sum(r) - 1 for r in rows]
        retrive_index.append([b * n + i for i in range(n)])
        next_token.append(nt)
        next_sibling.append(ns)
        masks.append(rows)
    if tree_mask_mode == FULL_MASK:
        flat = []
        for b in range(bs):
            for row in masks[b]:
                flat += [True] * seq_lens[b] + row
    elif tree_mask_mode == QLEN_ONLY:
        flat = [x for rows in masks for row in rows for x in row]
    else:
        flat = [sum(1 << j for j, x in enumerate(row) if x) for rows in masks for row in rows]
    return flat, positions, retrive_index, next_token, next_sibling


# ----------------------------------------------------------------------------- SGLang: verify


def _walk_links(b, next_token, next_sibling, num_spec_step, choose):
    """SGLang's level loop. ``choose(node, children in link order) -> accepted child or None``;
    returns the accepted path (engine nodes, root first)."""
    path = [0]
    for _ in range(1, num_spec_step):
        children, c = [], next_token[b][path[-1]]
        while c != -1:
            children.append(c)
            c = next_sibling[b][c]
        if not children:
            break
        accepted = choose(path[-1], children)
        if accepted is None:
            break
        path.append(accepted)
    return path


def _sglang_outputs(paths, emitted, retrive_index, num_spec_step, predicts):
    """predicts / accept_index / accept_token_num as SGLang writes them (accept_index -1 after)."""
    predicts = list(predicts)
    accept_index, accept_token_num = [], []
    for b, path in enumerate(paths):
        flat = [retrive_index[b][v] for v in path]
        for v, token in zip(flat, emitted[b]):
            predicts[v] = token
        accept_index.append(flat + [-1] * (num_spec_step - len(flat)))
        accept_token_num.append(len(path) - 1)
    return predicts, accept_index, accept_token_num


def sglang_verify_greedy(candidates, retrive_index, next_token, next_sibling, predicted,
                         num_spec_step: int, predicts: List[int]):
    """``verify_tree_greedy``; ``predicted[b][v]`` is the target's token after engine node v
    (``target_predict.flatten()[retrive_index[b][v]]`` for the sgl-kernel function)."""
    candidates, retrive_index = candidates.tolist(), retrive_index.tolist()
    next_token, next_sibling = next_token.tolist(), next_sibling.tolist()
    paths, emitted = [], []
    for b in range(len(candidates)):
        path = _walk_links(b, next_token, next_sibling, num_spec_step, lambda v, kids: next(
            (c for c in kids if candidates[b][c] == predicted[b][v]), None))
        paths.append(path)
        emitted.append([predicted[b][v] for v in path])
    return _sglang_outputs(paths, emitted, retrive_index, num_spec_step, predicts)


def sglang_verify_sampling(candidates, retrive_index, next_token, next_sibling, probs,
                           coins, final_coins, num_spec_step: int, predicts: List[int],
                           rule: str = "sglang", greedy: Optional[List[bool]] = None):
    """``tree_speculative_sampling_target_only`` at thresholds 1.0 (``rule="sglang"``) or the
    adapter's coin mapping (``rule="heterospec"``); see the module docstring.

    ``probs[b][v]``: float64 ``[V]`` target distribution after engine node v (renormalised here).
    ``greedy[b]`` (optional): that request walks greedily on ``argmax probs`` instead.
    """
    candidates, retrive_index = candidates.tolist(), retrive_index.tolist()
    next_token, next_sibling = next_token.tolist(), next_sibling.tolist()
    coins, final_coins = coins.tolist(), final_coins.tolist()
    paths, emitted = [], []
    for b in range(len(candidates)):
        if greedy is not None and greedy[b]:
            predicted = [int(torch.argmax(row)) for row in probs[b]]
            path = _walk_links(b, next_token, next_sibling, num_spec_step, lambda v, kids: next(
                (c for c in kids if candidates[b][c] == predicted[v]), None))
            paths.append(path)
            emitted.append([predicted[v] for v in path])
            continue
        residual = {}  # node -> residual distribution after its rejected children

        def choose(v, kids):
            r = probs[b][v].clone()
            if rule == "sglang":  # raw probabilities, one coin, cumulative sum, <=
                cumulative = 0.0
                for c in kids:
                    cumulative += float(probs[b][v][candidates[b][c]])
                    if coins[b][v] <= cumulative:
                        return c
                    r[candidates[b][c]] = 0.0
            else:  # the coin of the link predecessor, renormalised residual, <
                coin_of = {kids[0]: coins[b][v]}
                coin_of.update({c: coins[b][prev] for prev, c in zip(kids, kids[1:])})
                for i, c in enumerate(kids):
                    x = candidates[b][c]
                    if any(candidates[b][s] == x for s in kids[:i]):
                        continue  # a duplicate of an already rejected sibling
                    if coin_of[c] < float(r[x] / r.sum()):
                        return c
                    r[x] = 0.0
            residual[v] = r
            return None

        path = _walk_links(b, next_token, next_sibling, num_spec_step, choose)
        last = path[-1]
        final = residual.get(last, probs[b][last])
        paths.append(path)
        emitted.append([candidates[b][c] for c in path[1:]]
                       + [inverse_cdf(final, final_coins[b])])
    return _sglang_outputs(paths, emitted, retrive_index, num_spec_step, predicts)


# ----------------------------------------------------------------------------- vLLM


def vllm_rejection_sample(draft_token_ids, num_draft_tokens: List[int], max_spec_len: int,
                          draft_probs, target_logits, temperature, top_k, top_p, uniforms,
                          bonus_token_ids=None):
    """vLLM V1 ``RejectionSampler`` on ``target_logits [T + bs, V]`` (module docstring): column
    ``j >= 1`` of ``uniforms[b]`` tests draft j, column 0 draws the recovered / bonus token.
    ``temperature[b] <= 0`` is greedy (argmax of the raw row, lowest id on ties)."""
    drafts = draft_token_ids.tolist()
    logits = target_logits.double()
    out, start = [], 0
    for b, d in enumerate(num_draft_tokens):
        rows = logits[start + b: start + b + d + 1]  # d draft positions, then the bonus row
        row_out, t = [], float(temperature[b])
        k, top_p_b, u0 = int(top_k[b]), float(top_p[b]), float(uniforms[b, 0])
        for pos in range(d + 1):
            if t <= 0:
                emitted = int(torch.argmax(rows[pos]))
                accepted = pos < d and drafts[start + pos] == emitted
            else:
                p = processed_probs(rows[pos], t, k, top_p_b)
                if pos == d:
                    emitted, accepted = inverse_cdf(p, u0), False
                else:
                    x = drafts[start + pos]
                    q = draft_probs[start + pos].double() if draft_probs is not None else None
                    q_x = float(q[x]) if q is not None else 1.0
                    accepted = q_x > 0 and float(p[x]) / q_x >= float(uniforms[b, pos + 1])
                    if accepted:
                        emitted = x
                    else:
                        recovered = p.clone() if q is None else torch.clamp(p - q, min=0.0)
                        if q is None:
                            recovered[x] = 0.0
                        emitted = inverse_cdf(recovered, u0)
            if pos == d and bonus_token_ids is not None:
                emitted = int(bonus_token_ids.reshape(-1)[b])
            row_out.append(emitted)
            if not accepted:
                break
        out.append(row_out + [-1] * (max_spec_len + 1 - len(row_out)))
        start += d
    return out
