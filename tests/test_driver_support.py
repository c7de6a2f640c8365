"""Shared helpers for the driver tests (no tests of its own beyond a self-check).

``install_standins()`` registers slow pure-PyTorch CPU kernels for any heterospec op that has no
CPU kernel yet, so the driver can be developed and tested while the C++ kernels land. Once the
real kernels are merged it is a no-op: the driver tests then exercise the real ops.
"""
import math
import os

import torch

import heterospec_ext  # noqa: F401  (registers the schemas)

OPS = ("draft_topk_entropy", "stratify", "build_tree", "fused_verify")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"heterospec::{op}", "CPU")


def missing_ops():
    return [op for op in OPS if not has_cpu_kernel(op)]


# ----------------------------------------------------------------------------- stand-ins


def _draft_topk_entropy(logits, k, temperature=1.0):
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    p = logp.exp()
    entropy = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)
    # stable sort gives the lowest id on ties, as the contract asks
    order = torch.sort(-logp, dim=-1, stable=True).indices[:, :k]
    top_lp = torch.gather(logp, 1, order)
    renorm = torch.softmax(top_lp, dim=-1)
    top_h = -(torch.where(renorm > 0, renorm * renorm.clamp_min(1e-38).log(),
                          torch.zeros_like(renorm))).sum(-1)
    return top_lp, order, top_h, entropy, lse


def _stratify(step_entropy, confidence, parents, thresholds, policy):
    b, m = parents.shape
    path_h = torch.zeros(b, dtype=torch.float32)
    pstar = torch.zeros(b, dtype=torch.int64)
    stratum = torch.zeros(b, dtype=torch.int64)
    for r in range(b):
        par = parents[r].tolist()
        h = [0.0] * m
        best, best_c = 0, -math.inf
        for i in range(1, m):
            if par[i] < 0:
                continue
            h[i] = h[par[i]] + float(step_entropy[r, i])
            c = float(confidence[r, i])
            if c != c:
                c = -math.inf
            if best == 0 or c > best_c:
                best, best_c = i, c
        path_h[r] = h[best]
        pstar[r] = best
        stratum[r] = int((thresholds <= path_h[r]).sum())
    pol = policy[stratum]
    return path_h, pstar, stratum, pol[:, 0].clone(), pol[:, 1].clone()


def _build_tree(pool_parents, pool_scores, pool_tokens, top_n, n_max):
    b, m = pool_parents.shape
    i64 = torch.int64
    selected = torch.full((b, n_max), -1, dtype=i64)
    tokens = torch.full((b, n_max), -1, dtype=i64)
    parents = torch.full((b, n_max), -1, dtype=i64)
    depth = torch.zeros((b, n_max), dtype=i64)
    mask = torch.zeros((b, n_max, n_max), dtype=torch.bool)
    first_child = torch.full((b, n_max), -1, dtype=i64)
    next_sibling = torch.full((b, n_max), -1, dtype=i64)
    retrieve = torch.full((b, n_max, n_max), -1, dtype=i64)
    num_nodes = torch.zeros((b,), dtype=i64)
    for r in range(b):
        par = pool_parents[r].tolist()
        sc = [(-math.inf if s != s else s) for s in pool_scores[r].tolist()]
        valid = [i for i in range(1, m) if par[i] >= 0]
        want = max(1, min(int(top_n[r]), n_max, len(valid) + 1))
        taken = {0}
        order = sorted(valid, key=lambda i: (-sc[i], i))
        while len(taken) < want:
            for i in order:
                if i not in taken and par[i] in taken:
                    taken.add(i)
                    break
        sel = sorted(taken)
        pos = {p: j for j, p in enumerate(sel)}
        n = len(sel)
        num_nodes[r] = n
        for j, p in enumerate(sel):
            selected[r, j] = p
            tokens[r, j] = pool_tokens[r, p]
            if j > 0:
                parents[r, j] = pos[par[p]]
                depth[r, j] = depth[r, parents[r, j]] + 1
                mask[r, j] = mask[r, parents[r, j]]
            mask[r, j, j] = True
        for j in range(n, n_max):
            mask[r, j, j] = True
        last_child = {}
        for j in range(1, n):
            pj = int(parents[r, j])
            if pj in last_child:
                next_sibling[r, last_child[pj]] = j
            else:
                first_child[r, pj] = j
            last_child[pj] = j
        leaves = [j for j in range(n) if int(first_child[r, j]) < 0]
        for row, leaf in enumerate(leaves):
            path, v = [], leaf
            while v >= 0:
                path.append(v)
                v = int(parents[r, v]) if v > 0 else -1
            for c, v in enumerate(reversed(path)):
                retrieve[r, row, c] = v
    words = (n_max + 31) // 32
    packed = torch.zeros((b, n_max, words), dtype=torch.int64)
    for j in range(n_max):
        packed[:, :, j // 32] |= mask[:, :, j].to(torch.int64) << (j % 32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (selected, tokens, parents, depth, mask, packed, first_child, next_sibling,
            retrieve, num_nodes)


def _processed_probs(z_row, temperature, top_k, top_p):
    """Target processing of the fused_verify contract for one row (float64)."""
    z = z_row.double() / temperature
    v = z.numel()
    if 0 < top_k < v:
        kth = torch.topk(z, top_k).values[-1]
        z = torch.where(z >= kth, z, torch.full_like(z, -math.inf))
    p = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sp = torch.sort(p, descending=True).values
        cum = torch.cumsum(sp, 0)
        idx = int(torch.searchsorted(cum, torch.tensor(top_p, dtype=cum.dtype)))
        idx = min(idx, v - 1)
        cut = sp[idx]
        p = torch.where(p >= cut, p, torch.zeros_like(p))
    return p / p.sum()


def _fused_verify(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                  draft_probs=None):
    if draft_probs is not None:
        raise NotImplementedError("stand-in fused_verify: draft_probs not supported")
    b, n, _ = target_logits.shape
    out_tokens = torch.full((b, n), -1, dtype=torch.int64)
    accepted = torch.full((b, n), -1, dtype=torch.int64)
    num_acc = torch.zeros((b,), dtype=torch.int64)
    for r in range(b):
        par = parents[r].tolist()
        kids = {}
        for i in range(1, n):
            if par[i] >= 0:
                kids.setdefault(par[i], []).append(i)
        t = float(temperature[r])
        node, acc_nodes, toks = 0, [0], []
        while True:
            children = kids.get(node, [])
            if t == 0.0:
                best = int(torch.argmax(target_logits[r, node].float()))
                nxt = next((c for c in children if int(candidates[r, c]) == best), None)
                if nxt is None:
                    toks.append(best)
                    break
                toks.append(best)
                acc_nodes.append(nxt)
                node = nxt
                continue
            res = _processed_probs(target_logits[r, node], t, int(top_k[r]), float(top_p[r]))
            seen, nxt = set(), None
            for c in children:
                x = int(candidates[r, c])
                if x in seen:
                    continue
                seen.add(x)
                if float(uniforms[r, c]) < float(res[x]):
                    nxt = c
                    break
                res[x] = 0.0
                res = res / res.sum()
            if nxt is not None:
                toks.append(int(candidates[r, nxt]))
                acc_nodes.append(nxt)
                node = nxt
                continue
            cdf = torch.cumsum(res, 0)
            pick = int(torch.searchsorted(cdf, float(uniforms[r, 0]) * float(cdf[-1]), right=True))
            if pick >= res.numel() or res[pick] <= 0:
                pick = int(torch.nonzero(res > 0)[-1])
            toks.append(pick)
            break
        a = len(acc_nodes) - 1
        num_acc[r] = a
        out_tokens[r, :a + 1] = torch.tensor(toks)
        accepted[r, :a + 1] = torch.tensor(acc_nodes)
    return out_tokens, accepted, num_acc


_STANDINS = {
    "draft_topk_entropy": _draft_topk_entropy,
    "stratify": _stratify,
    "build_tree": _build_tree,
    "fused_verify": _fused_verify,
}
_LIBS = []


def install_standins():
    """Register a CPU stand-in for each op that has no CPU kernel; returns the ops patched."""
    patched = []
    for op in missing_ops():
        lib = torch.library.Library("heterospec", "IMPL")
        lib.impl(op, _STANDINS[op], "CPU")
        _LIBS.append(lib)
        patched.append(op)
    return patched


def test_standins_only_fill_gaps():
    install_standins()
    assert missing_ops() == []


# ----------------------------------------------------------------------------- models

try:
    import heterospec  # noqa: F401
except ImportError:  # running from a source tree without `pip install -e .`
    import sys

    sys.path.insert(0, os.path.join(REPO_ROOT, "python"))


def tiny_llama(vocab=32, seed=0, layers=2, hidden=32, logit_scale=1.0):
    """A randomly initialised small Llama (eager attention, fp32) for fast exact tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      attn_implementation="eager", bos_token_id=0, eos_token_id=1,
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


class FakeTokenizer:
    """Just enough tokenizer for the vocabulary check."""

    def __init__(self, vocab):
        self._vocab = dict(vocab)

    def get_vocab(self):
        return dict(self._vocab)


def cache_tensors(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_cache_matches_fresh(lm, cache, committed, atol=1e-4):
    """The committed cache equals a plain causal forward over the same tokens."""
    n = cache.get_seq_length()
    fresh = lm.new_cache()
    lm.causal_forward(torch.tensor(committed[:n], dtype=torch.int64), fresh)
    for (k, v), (fk, fv) in zip(cache_tensors(cache), cache_tensors(fresh)):
        assert k.shape == fk.shape, (k.shape, fk.shape)
        torch.testing.assert_close(k, fk, atol=atol, rtol=1e-4)
        torch.testing.assert_close(v, fv, atol=atol, rtol=1e-4)
