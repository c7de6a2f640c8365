"""heterospec_ext.integrations.sglang: SGLang's published test vectors, agreement with a float64
oracle of SGLang's semantics on hundreds of random trees in SGLang's format, per-request budgets,
the coin mapping, malformed input, install(), and a chi-square test of the sampling paths
against the exact target law that rejects planted coin-mapping bugs.
"""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import heterospec_ext as hx
from heterospec_ext.integrations import reference as ref
from heterospec_ext.integrations import sglang as sg
from heterospec_ext.testing import (TokenPathTarget, assert_matches_exact_law, chi_square,
                                    joint_counts, random_parent_row)

FULL, QLEN, PACKED = sg.FULL_MASK, sg.QLEN_ONLY, sg.QLEN_ONLY_BITPACKING
KINDS = ("ragged", "star", "chain", "kary", "padded")


# ----------------------------------------------------------------------------- SGLang's vectors
# sgl-kernel tests/speculative/test_eagle_utils.py and test_speculative_sampling.py: two requests,
# six nodes each; request 1 is numbered out of order (root -> 4, sibling 1; 1 -> 2 -> 3; 4 -> 5).

PUBLISHED_TREE = dict(
    candidates=[[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]],
    retrive_index=[[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]],
    retrive_next_token=[[1, 2, -1, 4, 5, -1], [4, 2, 3, -1, 5, -1]],
    retrive_next_sibling=[[-1, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 1, -1]],
)
PUBLISHED_PREDICTS = [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18]
PUBLISHED_ACCEPT_INDEX = [[0, 3, 4, 5], [6, 10, 11, -1]]
PUBLISHED_ACCEPT_TOKEN_NUM = [3, 2]


def published_tree(device):
    return {k: torch.tensor(v, device=device) for k, v in PUBLISHED_TREE.items()}


def published_logits(device):
    """Logits 1 everywhere, 10 at the target's choice after each node (18 where unspecified)."""
    logits = torch.full((2, 6, 20), 1.0)
    for b, v, token in ((0, 0, 3), (0, 3, 4), (0, 4, 5), (1, 0, 11), (1, 4, 12)):
        logits[b, v, token] = 10.0
    logits[:, :, 18] = torch.where(logits.amax(-1) < 10, 10.0, 1.0)
    return logits.to(device)


def fresh_outputs(bs, n, steps, device, fill=-1):
    return (torch.full((bs * n,), fill, dtype=torch.int32, device=device),
            torch.full((bs, steps), -1, dtype=torch.int32, device=device),
            torch.zeros(bs, dtype=torch.int32, device=device))


def test_verify_tree_greedy_published_vector(device):
    tree = published_tree(device)
    out = fresh_outputs(2, 6, 4, device)
    sg.verify_tree_greedy(*out, tree["candidates"], tree["retrive_index"],
                          tree["retrive_next_token"], tree["retrive_next_sibling"],
                          published_logits(device).argmax(-1))
    assert out[0].tolist() == PUBLISHED_PREDICTS
    assert out[1].tolist() == PUBLISHED_ACCEPT_INDEX
    assert out[2].tolist() == PUBLISHED_ACCEPT_TOKEN_NUM


@pytest.mark.parametrize("seed", range(5))
def test_target_only_published_vector(device, seed):
    """Thresholds (1, 1) at temperature 0.01: the published outputs for any coins."""
    gen = torch.Generator().manual_seed(seed)
    tree = published_tree(device)
    probs = F.softmax(published_logits(device) / 0.01, dim=-1)
    out = fresh_outputs(2, 6, 4, device)
    sg.tree_speculative_sampling_target_only(
        *out, tree["candidates"], tree["retrive_index"], tree["retrive_next_token"],
        tree["retrive_next_sibling"], torch.rand(2, 6, generator=gen).to(device),
        torch.rand(2, generator=gen).to(device), probs, torch.zeros_like(probs), 1.0, 1.0, True)
    assert out[0].tolist() == PUBLISHED_PREDICTS
    assert out[1].tolist() == PUBLISHED_ACCEPT_INDEX
    assert out[2].tolist() == PUBLISHED_ACCEPT_TOKEN_NUM


def test_target_only_lossy_thresholds_raise(device):
    """SGLang's second published case, thresholds (0, 0), accepts tokens regardless of the target:
    refused with a message naming both thresholds."""
    tree = published_tree(device)
    probs = F.softmax(published_logits(device) / 0.01, dim=-1)
    out = fresh_outputs(2, 6, 4, device)
    for single, acc in ((0.0, 0.0), (1.0, 0.5), (0.9, 1.0)):
        with pytest.raises(ValueError, match="threshold_single.*threshold_acc.*lossless"):
            sg.tree_speculative_sampling_target_only(
                *out, tree["candidates"], tree["retrive_index"], tree["retrive_next_token"],
                tree["retrive_next_sibling"], torch.rand(2, 6, device=device),
                torch.rand(2, device=device), probs, None, single, acc, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_logits_published_vector(device, dtype):
    """The fused path on the published logits: near-greedy (T = 0.01, with top-k / top-p) and
    greedy (T = 0) requests both give the published outputs; [bs * n, V] logits are accepted."""
    tree = published_tree(device)
    out = fresh_outputs(2, 6, 4, device)
    sg.tree_speculative_sampling_from_logits(
        *out, tree["candidates"], tree["retrive_index"], tree["retrive_next_token"],
        tree["retrive_next_sibling"], torch.rand(2, 6, device=device),
        torch.rand(2, device=device), published_logits(device).to(dtype).view(12, 20),
        torch.tensor([[0.01], [0.0]], device=device), torch.tensor([5, 1 << 30], device=device),
        torch.tensor([0.9, 1.0], device=device))
    assert out[0].tolist() == PUBLISHED_PREDICTS
    assert out[1].tolist() == PUBLISHED_ACCEPT_INDEX
    assert out[2].tolist() == PUBLISHED_ACCEPT_TOKEN_NUM


def test_oracle_reproduces_published_vectors():
    """The oracle models SGLang: it gives the published outputs, with SGLang's coin rule."""
    tree = published_tree("cpu")
    logits = published_logits("cpu")
    predicted = logits.argmax(-1).tolist()
    got = ref.sglang_verify_greedy(tree["candidates"], tree["retrive_index"],
                                   tree["retrive_next_token"], tree["retrive_next_sibling"],
                                   predicted, 4, [-1] * 12)
    assert got == (PUBLISHED_PREDICTS, PUBLISHED_ACCEPT_INDEX, PUBLISHED_ACCEPT_TOKEN_NUM)
    probs = F.softmax(logits / 0.01, dim=-1).double()
    for rule in ("sglang", "heterospec"):
        got = ref.sglang_verify_sampling(
            tree["candidates"], tree["retrive_index"], tree["retrive_next_token"],
            tree["retrive_next_sibling"], probs, torch.rand(2, 6), torch.rand(2), 4, [-1] * 12,
            rule=rule)
        assert got == (PUBLISHED_PREDICTS, PUBLISHED_ACCEPT_INDEX, PUBLISHED_ACCEPT_TOKEN_NUM)


# python/sglang/srt/speculative/build_eagle_tree.py, test_build_tree_kernel_efficient: EAGLE
# score/token/parent lists for two requests (topk 4, depth 4, 8 draft tokens).

EAGLE_VERIFIED_ID = [29974, 13]
EAGLE_SCORES = [
    [[[7.1127e-01, 2.8292e-01, 2.2995e-03, 1.7357e-03]],
     [[9.7476e-01, 2.2219e-02, 6.5031e-04, 1.3212e-04]]],
    [[[6.9142e-01, 1.2863e-02, 1.6873e-03, 1.1871e-03],
      [2.4787e-01, 1.8818e-02, 1.4204e-02, 9.2235e-04],
      [2.2971e-03, 1.6700e-06, 1.8737e-07, 8.3146e-08],
      [1.2771e-03, 2.4374e-04, 1.7832e-04, 1.1947e-05]],
     [[8.4832e-02, 6.6068e-02, 5.8304e-02, 5.7851e-02],
      [2.3616e-03, 1.1243e-03, 5.4368e-04, 2.7768e-04],
      [2.5286e-04, 1.5578e-04, 2.8817e-05, 1.2888e-05],
      [1.2834e-04, 2.5417e-06, 1.1279e-06, 1.6088e-08]]],
    [[[6.6438e-01, 2.6997e-02, 2.4236e-05, 4.0821e-06],
      [2.4402e-01, 2.8409e-03, 5.0935e-04, 2.9022e-04],
      [1.6178e-02, 2.0567e-03, 4.5892e-04, 3.0034e-05],
      [1.3023e-02, 5.0497e-04, 3.6371e-04, 8.7750e-05]],
     [[2.3263e-02, 2.0054e-02, 9.3990e-03, 2.7783e-03],
      [6.4156e-02, 5.5506e-04, 1.0429e-04, 9.7211e-05],
      [4.9950e-02, 5.0630e-03, 9.0068e-04, 3.3656e-04],
      [7.5817e-03, 8.5731e-04, 6.9972e-04, 6.0793e-04]]],
    [[[6.6420e-01, 1.0525e-04, 6.5864e-05, 1.2253e-06],
      [1.3019e-01, 1.0461e-01, 5.2083e-03, 1.6777e-03],
      [2.0103e-02, 6.7335e-03, 1.2625e-04, 1.0364e-05],
      [1.5142e-02, 7.0819e-04, 9.6595e-05, 8.7951e-05]],
     [[5.8608e-02, 1.8840e-03, 7.8535e-04, 4.4400e-04],
      [1.2185e-02, 2.0684e-03, 1.7418e-03, 1.4327e-03],
      [6.2455e-03, 6.1487e-03, 2.6862e-03, 1.8034e-03],
      [1.8590e-03, 1.6151e-03, 1.2481e-03, 3.6038e-04]]],
]
EAGLE_TOKENS = [
    [[29896, 29906, 29900, 29945], [13, 2, 29871, 28956]],
    [[29889, 29974, 29945, 29900, 29974, 29922, 29930, 29958, 29889, 29974, 29930, 29945, 29974,
      29922, 29930, 29958],
     [22550, 4136, 16492, 8439, 29871, 2, 3001, 13, 2, 13, 29906, 29946, 2, 13, 29871, 259]],
    [[29946, 29945, 29953, 29906, 29896, 29945, 29900, 29906, 29896, 29945, 29906, 29953, 29896,
      29945, 29906, 29946],
     [29871, 2, 29901, 29889, 29871, 2, 395, 259, 29901, 29871, 2, 29889, 3001, 1234, 7146, 2186]],
    [[29946, 29974, 29945, 29930, 29889, 29922, 29974, 29930, 29974, 29946, 29930, 29922, 29889,
      29974, 29945, 29922],
     [29941, 29906, 2, 29946, 29871, 450, 319, 14990, 29946, 29941, 2, 29906, 29871, 2, 3001, 13]],
]
EAGLE_PARENTS = [[[-1, 0, 1, 2, 3], [-1, 0, 1, 2, 3]], [[4, 8, 9, 10], [4, 5, 6, 7]],
                 [[20, 24, 21, 28], [24, 28, 20, 21]], [[36, 40, 41, 44], [36, 40, 44, 45]]]
EAGLE_SEQ_LENS = [5, 10]
EAGLE_POSITIONS = [5, 6, 6, 7, 7, 8, 8, 9, 10, 11, 12, 12, 12, 12, 13, 14]
EAGLE_RETRIVE_INDEX = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
EAGLE_NEXT_TOKEN = [[1, 3, 4, 5, 6, 7, -1, -1], [1, 2, -1, 6, -1, -1, 7, -1]]
EAGLE_NEXT_SIBLING = [[-1, 2, -1, -1, -1, -1, -1, -1], [-1, -1, 3, 4, 5, -1, -1, -1]]
EAGLE_DRAFT_TOKENS = [29974, 29896, 29906, 29889, 29974, 29946, 29896, 29946, 13, 13, 22550, 4136,
                      16492, 8439, 29871, 29941]


def eagle_lists(device):
    t = lambda x, dtype=torch.int64: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
    return (t(EAGLE_VERIFIED_ID), [t(s, torch.float32) for s in EAGLE_SCORES],
            [t(x) for x in EAGLE_TOKENS], [t(p) for p in EAGLE_PARENTS])


def selection(score_list, n):
    """SGLang's build_tree_kernel_efficient_preprocess: top-(n-1) scores, sorted indices."""
    scores = torch.cat([s.flatten(1) for s in score_list], 1)
    return torch.sort(torch.topk(scores, n - 1, dim=-1).indices, dim=-1).values


def empty_mask(mode, bs, n, seq_lens):
    if mode == FULL:
        return torch.ones(int(seq_lens.sum()) * n + n * n * bs, dtype=torch.bool,
                          device=seq_lens.device)
    if mode == QLEN:
        return torch.ones(bs * n * n, dtype=torch.bool, device=seq_lens.device)
    dtype = torch.uint8 if n <= 8 else (torch.uint16 if n <= 16 else torch.uint32)
    return torch.zeros(bs * n, dtype=dtype, device=seq_lens.device)


def run_build(parent_list, selected, seq_lens, topk, depth, n, mode, fill=-1):
    bs = seq_lens.shape[0]
    tree_mask = empty_mask(mode, bs, n, seq_lens)
    positions = torch.full((bs * n,), fill, dtype=torch.int64, device=seq_lens.device)
    links = torch.full((3, bs, n), fill, dtype=torch.int64, device=seq_lens.device)
    sg.build_tree_kernel_efficient(parent_list, selected, seq_lens, tree_mask, positions,
                                   links[0], links[1], links[2], topk, depth, n, mode)
    return tree_mask, positions, links


def mask_as_list(tree_mask, mode):
    if mode == PACKED:
        return tree_mask.to(torch.int64).tolist()
    return tree_mask.tolist()


@pytest.mark.parametrize("mode", [FULL, QLEN, PACKED])
def test_build_tree_published_vector(device, mode):
    _, score_list, _, parents_list = eagle_lists(device)
    seq_lens = torch.tensor(EAGLE_SEQ_LENS, device=device)
    parent_list = torch.cat(parents_list[:-1], 1)
    tree_mask, positions, links = run_build(parent_list, selection(score_list, 8), seq_lens, 4, 4,
                                            8, mode, fill=7)  # no -1 prefill needed
    assert positions.tolist() == EAGLE_POSITIONS
    assert links[0].tolist() == EAGLE_RETRIVE_INDEX
    assert links[1].tolist() == EAGLE_NEXT_TOKEN
    assert links[2].tolist() == EAGLE_NEXT_SIBLING
    want = ref.sglang_build_tree(parent_list.cpu(), selection(score_list, 8).cpu(),
                                 seq_lens.cpu(), 4, 8, mode)
    assert mask_as_list(tree_mask, mode) == want[0]
    assert want[1:] == (EAGLE_POSITIONS, EAGLE_RETRIVE_INDEX, EAGLE_NEXT_TOKEN,
                        EAGLE_NEXT_SIBLING)


def test_per_request_builder_published_vector(device):
    """Every budget equal to SGLang's num_verify_tokens: the published outputs, draft tokens
    included."""
    verified_id, score_list, token_list, parents_list = eagle_lists(device)
    pool = sg.draft_pool(verified_id, score_list, token_list, parents_list)
    seq_lens = torch.tensor(EAGLE_SEQ_LENS, device=device)
    out = sg.build_tree_per_request(pool, torch.tensor([8, 8], device=device), 8, seq_lens, QLEN)
    assert out.draft_tokens.tolist() == EAGLE_DRAFT_TOKENS
    assert out.positions.tolist() == EAGLE_POSITIONS
    assert out.retrive_index.tolist() == EAGLE_RETRIVE_INDEX
    assert out.retrive_next_token.tolist() == EAGLE_NEXT_TOKEN
    assert out.retrive_next_sibling.tolist() == EAGLE_NEXT_SIBLING
    assert out.num_draft_tokens.tolist() == [8, 8]


# ----------------------------------------------------------------------------- random SGLang trees


def tree_shape(kind, n, gen):
    """Parents over ``n`` slots in parent-first numbering; -1 marks a slot outside the tree.
    ``kary``: every node has k in [2, 4] children in breadth-first order; the other kinds are
    test_fused_verify's (``ragged`` is its "bushy")."""
    if kind == "kary":
        k = 2 + int(torch.randint(0, 3, (1,), generator=gen))
        return [-1] + [(i - 1) // k for i in range(1, n)]
    return random_parent_row({"ragged": "bushy"}.get(kind, kind), n, gen).tolist()


def linked_trees(bs, n, gen, *, permute_nodes=True, permute_index=True, kinds=KINDS):
    """A batch in SGLang's format: random shapes, node slots renumbered at random (root kept at
    0), siblings linked in random order, a detached two-node fragment in some padded requests,
    and ``retrive_index`` a random permutation of ``[0, bs * n)``. Returns the link tensors,
    ``retrive_index`` and the children of every slot in link order."""
    next_token = torch.full((bs, n), -1, dtype=torch.int64)
    next_sibling = torch.full((bs, n), -1, dtype=torch.int64)
    children = []
    for b in range(bs):
        kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=gen))]
        shape = tree_shape(kind, n, gen)
        slot = [0] + ((torch.randperm(n - 1, generator=gen) + 1).tolist() if permute_nodes
                      else list(range(1, n)))
        kids = {slot[i]: [] for i in range(n)}
        for i in range(1, n):
            if shape[i] >= 0:
                kids[slot[shape[i]]].append(slot[i])
        for v, cs in kids.items():
            if permute_nodes:
                cs[:] = [cs[j] for j in torch.randperm(len(cs), generator=gen).tolist()]
            if cs:
                next_token[b, v] = cs[0]
            for a, c in zip(cs, cs[1:]):
                next_sibling[b, a] = c
        outside = [slot[i] for i in range(1, n) if shape[i] < 0]
        if len(outside) >= 2:  # a fragment no link from the root reaches
            next_token[b, outside[0]] = outside[1]
        children.append(kids)
    if permute_index:
        retrive_index = torch.randperm(bs * n, generator=gen).view(bs, n)
    else:
        retrive_index = torch.arange(bs * n).view(bs, n)
    return next_token, next_sibling, retrive_index, children


def draft_tokens_for(children, bs, n, vocab, gen, dup_rate=0.2):
    """Candidate tokens; some siblings repeat an earlier sibling's token."""
    tokens = torch.randint(0, vocab, (bs, n), generator=gen)
    for b in range(bs):
        for kids in children[b].values():
            for i in range(1, len(kids)):
                if float(torch.rand((), generator=gen)) < dup_rate:
                    tokens[b, kids[i]] = tokens[b, kids[int(torch.randint(0, i, (1,),
                                                                          generator=gen))]]
    return tokens


def greedy_predictions(children, tokens, vocab, gen, hit=0.75):
    """The target's token after each slot: usually one of its children's tokens."""
    bs, n = tokens.shape
    predicted = torch.randint(0, vocab, (bs, n), generator=gen)
    for b in range(bs):
        for v, kids in children[b].items():
            if kids and float(torch.rand((), generator=gen)) < hit:
                predicted[b, v] = tokens[b, kids[int(torch.randint(0, len(kids), (1,),
                                                                   generator=gen))]]
    return predicted


def test_read_linked_tree_renumbering():
    """Parent-first numbering is kept as is; any other numbering becomes one where parents
    precede children and siblings keep their link order."""
    from heterospec_ext.integrations._linked_tree import read_linked_tree
    gen = torch.Generator().manual_seed(0)
    nt, ns, _, _ = linked_trees(40, 11, gen, permute_nodes=False)
    tree = read_linked_tree(nt, ns, max_depth=20)
    assert torch.equal(tree.order, torch.arange(11).expand(40, 11))
    nt, ns, _, children = linked_trees(40, 11, gen)
    tree = read_linked_tree(nt, ns, max_depth=20)
    assert bool(tree.well_formed.all())
    for b in range(40):
        order = tree.order[b].tolist()
        ours = {v: j for j, v in enumerate(order)}
        assert order[0] == 0
        for v, kids in children[b].items():
            if not tree.in_tree[b, v]:
                continue
            for c in kids:
                assert int(tree.parents[b, ours[c]]) == ours[v] and ours[v] < ours[c]
            assert [ours[c] for c in kids] == sorted(ours[c] for c in kids)


@pytest.mark.parametrize("permute", [False, True], ids=["parent_first", "permuted"])
def test_verify_tree_greedy_matches_oracle(device, permute):
    gen = torch.Generator().manual_seed(11 + permute)
    trees = 0
    for trial in range(40):
        bs, n, vocab = 1 + trial % 8, 2 + int(torch.randint(0, 15, (1,), generator=gen)), 9
        steps = 1 + int(torch.randint(0, n + 1, (1,), generator=gen))  # cuts deep nodes too
        nt, ns, ri, children = linked_trees(bs, n, gen, permute_nodes=permute,
                                            permute_index=permute)
        tokens = draft_tokens_for(children, bs, n, vocab, gen)
        predicted = greedy_predictions(children, tokens, vocab, gen)
        target_predict = torch.empty(bs * n, dtype=torch.int64)
        target_predict[ri.reshape(-1)] = predicted.reshape(-1)
        predicts_init = torch.randint(-3, 50, (bs * n,), dtype=torch.int32, generator=gen)
        want = ref.sglang_verify_greedy(tokens, ri, nt, ns, predicted.tolist(), steps,
                                        predicts_init.tolist())
        out = (predicts_init.clone().to(device),) + fresh_outputs(bs, n, steps, device)[1:]
        d = lambda t: t.to(device)  # noqa: E731
        sg.verify_tree_greedy(*out, d(tokens), d(ri), d(nt), d(ns),
                              d(target_predict.view(bs, n)))
        assert (out[0].tolist(), out[1].tolist(), out[2].tolist()) == want, trial
        trees += bs
    assert trees >= 150


def quantised_probs(children, tokens, vocab, gen, bs, n):
    """Rows of integer weights summing to 64 (exact in float32), heavier on children's tokens so
    that walks go deep. With coins that are odd multiples of 1/4096 no acceptance test or final
    draw can tie, so float32 and float64 decide alike."""
    weights = torch.randint(0, 2, (bs, n, vocab), generator=gen).double()
    for b in range(bs):
        for v, kids in children[b].items():
            for c in kids:
                weights[b, v, tokens[b, c]] += float(torch.randint(2, 40, (1,), generator=gen))
    weights[:, :, 0] += 1  # no empty row
    weights = torch.floor(weights / weights.sum(-1, keepdim=True) * 64)
    weights[:, :, 0] += 64 - weights.sum(-1)
    return weights / 64


def odd_coins(shape, gen):
    return (2 * torch.randint(0, 2048, shape, generator=gen) + 1).float() / 4096


@pytest.mark.parametrize("permute", [False, True], ids=["parent_first", "permuted"])
def test_target_only_matches_oracle(device, permute):
    """Decision for decision the adapter's documented coin mapping (oracle rule "heterospec")."""
    gen = torch.Generator().manual_seed(21 + permute)
    trees = 0
    for trial in range(40):
        bs, n, vocab = 1 + trial % 8, 2 + int(torch.randint(0, 15, (1,), generator=gen)), 13
        steps = 1 + int(torch.randint(0, n + 1, (1,), generator=gen))
        nt, ns, ri, children = linked_trees(bs, n, gen, permute_nodes=permute,
                                            permute_index=permute)
        tokens = draft_tokens_for(children, bs, n, vocab, gen)
        probs = quantised_probs(children, tokens, vocab, gen, bs, n)
        coins, final = odd_coins((bs, n), gen), odd_coins((bs,), gen)
        predicts_init = torch.randint(-3, 50, (bs * n,), dtype=torch.int32, generator=gen)
        want = ref.sglang_verify_sampling(tokens, ri, nt, ns, probs, coins, final, steps,
                                          predicts_init.tolist(), rule="heterospec")
        out = (predicts_init.clone().to(device),) + fresh_outputs(bs, n, steps, device)[1:]
        d = lambda t: t.to(device)  # noqa: E731
        sg.tree_speculative_sampling_target_only(*out, d(tokens), d(ri), d(nt), d(ns), d(coins),
                                                 d(final), d(probs.float()))
        assert (out[0].tolist(), out[1].tolist(), out[2].tolist()) == want, trial
        trees += bs
    assert trees >= 150


def test_target_only_equals_sglang_on_first_children():
    """Where every node has at most one child with a distinct token, SGLang's own coin rule and
    the adapter decide identically (same coins, same comparisons up to ``<`` vs ``<=``)."""
    gen = torch.Generator().manual_seed(31)
    for trial in range(30):
        bs, n, vocab = 4, 2 + trial % 12, 11
        nt, ns, ri, children = linked_trees(bs, n, gen, kinds=("chain",))
        tokens = draft_tokens_for(children, bs, n, vocab, gen, dup_rate=0.0)
        probs = quantised_probs(children, tokens, vocab, gen, bs, n)
        coins, final = odd_coins((bs, n), gen), odd_coins((bs,), gen)
        steps = n
        sglang = ref.sglang_verify_sampling(tokens, ri, nt, ns, probs, coins, final, steps,
                                            [-1] * (bs * n), rule="sglang")
        out = fresh_outputs(bs, n, steps, "cpu")
        sg.tree_speculative_sampling_target_only(*out, tokens, ri, nt, ns, coins, final,
                                                 probs.float())
        assert (out[0].tolist(), out[1].tolist(), out[2].tolist()) == sglang, trial


def test_sglang_rule_differs_on_later_siblings():
    """The documented difference: a second sibling is decided by SGLang's cumulative test on the
    parent's coin, by the adapter on the first sibling's coin. Parent coin 0.55, p = (0.5, 0.3):
    SGLang accepts the second sibling (0.55 <= 0.8); the adapter tests 0.9 < 0.3 / 0.5 and
    rejects both, drawing from the residual."""
    nt = torch.tensor([[1, -1, -1]])
    ns = torch.tensor([[-1, 2, -1]])
    ri = torch.arange(3).view(1, 3)
    tokens = torch.tensor([[0, 1, 2]])
    probs = torch.tensor([[[0.0, 0.5, 0.3, 0.2]] * 3], dtype=torch.float64)
    coins, final = torch.tensor([[0.55, 0.9, 0.1]]), torch.tensor([0.5])
    sglang = ref.sglang_verify_sampling(tokens, ri, nt, ns, probs, coins, final, 3, [-1] * 3)
    assert sglang[1] == [[0, 2, -1]]
    out = fresh_outputs(1, 3, 3, "cpu")
    sg.tree_speculative_sampling_target_only(*out, tokens, ri, nt, ns, coins, final,
                                             probs.float())
    assert out[1].tolist() == [[0, -1, -1]] and out[0][0] == 3  # only token 3 is left


def test_zero_coin_never_accepts_zero_probability():
    """SGLang accepts on coin <= S, so a coin of exactly 0 accepts a token of probability 0; the
    adapter's strict test does not."""
    nt, ns, ri = torch.tensor([[1, -1]]), torch.tensor([[-1, -1]]), torch.tensor([[0, 1]])
    tokens = torch.tensor([[0, 2]])
    probs = torch.tensor([[[0.5, 0.5, 0.0]] * 2], dtype=torch.float64)
    coins, final = torch.zeros(1, 2), torch.tensor([0.7])
    sglang = ref.sglang_verify_sampling(tokens, ri, nt, ns, probs, coins, final, 2, [-1] * 2)
    assert sglang[2] == [1]
    out = fresh_outputs(1, 2, 2, "cpu")
    sg.tree_speculative_sampling_target_only(*out, tokens, ri, nt, ns, coins, final,
                                             probs.float())
    assert out[2].tolist() == [0] and out[0][0] == 1


def test_duplicate_siblings_count_once():
    """SGLang adds a duplicated sibling token's probability twice (coin 0.5 in [0.3, 0.6]
    accepts the duplicate); the adapter tests the token once."""
    nt, ns = torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 2, -1]])
    ri, tokens = torch.arange(3).view(1, 3), torch.tensor([[0, 1, 1]])
    probs = torch.tensor([[[0.7, 0.3]] * 3], dtype=torch.float64)
    coins, final = torch.tensor([[0.5, 0.99, 0.0]]), torch.tensor([0.2])
    sglang = ref.sglang_verify_sampling(tokens, ri, nt, ns, probs, coins, final, 3, [-1] * 3)
    assert sglang[1] == [[0, 2, -1]]
    out = fresh_outputs(1, 3, 3, "cpu")
    sg.tree_speculative_sampling_target_only(*out, tokens, ri, nt, ns, coins, final,
                                             probs.float())
    assert out[1].tolist() == [[0, -1, -1]] and out[0][0] == 0


def integer_weight_logits(children, tokens, vocab, gen, bs, n, dtype):
    """float32: log of integer weights (probabilities rational at T = 1); half types: small
    integer logits (exact in bf16 / fp16)."""
    if dtype == torch.float32:
        weights = quantised_probs(children, tokens, vocab, gen, bs, n) * 64
        return weights.log().float()
    logits = torch.randint(-4, 3, (bs, n, vocab), generator=gen).float()
    for b in range(bs):
        for v, kids in children[b].items():
            for c in kids:
                logits[b, v, tokens[b, c]] += float(torch.randint(0, 4, (1,), generator=gen))
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_logits_matches_oracle(device, dtype):
    """Mixed greedy / sampled requests with per-request temperature, top-k and top-p, against
    the oracle on float64 processed probabilities."""
    gen = torch.Generator().manual_seed(41 + DTYPE_SEED[dtype])
    temperatures = [0.0, 1.0, 0.5, 1.7]
    top_ks, top_ps = [0, 3, 1 << 30, 6], [1.0, 0.83, 0.61, 1.0]
    trees = 0
    for trial in range(30):
        bs, n, vocab = 1 + trial % 8, 2 + int(torch.randint(0, 13, (1,), generator=gen)), 12
        steps = 1 + int(torch.randint(0, n + 1, (1,), generator=gen))
        nt, ns, ri, children = linked_trees(bs, n, gen)
        tokens = draft_tokens_for(children, bs, n, vocab, gen)
        logits = integer_weight_logits(children, tokens, vocab, gen, bs, n, dtype)
        pick = torch.randint(0, 4, (3, bs), generator=gen)
        temperature = torch.tensor([temperatures[i] for i in pick[0]])
        top_k = torch.tensor([top_ks[i] for i in pick[1]])
        top_p = torch.tensor([top_ps[i] for i in pick[2]])
        coins, final = odd_coins((bs, n), gen), odd_coins((bs,), gen)
        probs = [[ref.processed_probs(logits[b, v].double(), float(temperature[b]) or 1.0,
                                      int(top_k[b]), float(top_p[b])) for v in range(n)]
                 for b in range(bs)]
        rows = [[logits[b, v].double() for v in range(n)] for b in range(bs)]
        greedy = [float(t) == 0.0 for t in temperature]
        table = [rows[b] if greedy[b] else probs[b] for b in range(bs)]
        want = ref.sglang_verify_sampling(tokens, ri, nt, ns, table, coins, final, steps,
                                          [-1] * (bs * n), rule="heterospec", greedy=greedy)
        out = fresh_outputs(bs, n, steps, device)
        d = lambda t: t.to(device)  # noqa: E731
        sg.tree_speculative_sampling_from_logits(*out, d(tokens), d(ri), d(nt), d(ns), d(coins),
                                                 d(final), d(logits), d(temperature), d(top_k),
                                                 d(top_p))
        assert (out[0].tolist(), out[1].tolist(), out[2].tolist()) == want, trial
        trees += bs
    assert trees >= 120


DTYPE_SEED = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def test_cuda_code_path_on_cpu(monkeypatch):
    """With host reads disabled (what the adapters do on CUDA) the rows are always gathered and
    the results are unchanged."""
    gen = torch.Generator().manual_seed(51)
    bs, n, vocab = 6, 9, 13
    nt, ns, ri, children = linked_trees(bs, n, gen)
    tokens = draft_tokens_for(children, bs, n, vocab, gen)
    probs = quantised_probs(children, tokens, vocab, gen, bs, n).float()
    coins, final = odd_coins((bs, n), gen), odd_coins((bs,), gen)
    args = (tokens, ri, nt, ns, coins, final)
    host = fresh_outputs(bs, n, 5, "cpu")
    sg.tree_speculative_sampling_target_only(*host, *args, probs)
    monkeypatch.setattr(sg, "on_host", lambda t: False)
    device_like = fresh_outputs(bs, n, 5, "cpu")
    sg.tree_speculative_sampling_target_only(*device_like, *args, probs)
    assert all(torch.equal(a, b) for a, b in zip(host, device_like))


def test_parent_first_promise(monkeypatch):
    """``parent_first=True`` reads the rows in place: same results on parent-first trees; a
    request that breaks the promise raises on CPU and, without host reads (CUDA), reaches the op
    as an invalid tree."""
    gen = torch.Generator().manual_seed(53)
    bs, n, vocab = 6, 9, 13
    nt, ns, ri, children = linked_trees(bs, n, gen, permute_nodes=False)
    tokens = draft_tokens_for(children, bs, n, vocab, gen)
    probs = quantised_probs(children, tokens, vocab, gen, bs, n).float()
    coins, final = odd_coins((bs, n), gen), odd_coins((bs,), gen)
    args = (tokens, ri, nt, ns, coins, final)
    plain, promised = fresh_outputs(bs, n, 5, "cpu"), fresh_outputs(bs, n, 5, "cpu")
    sg.tree_speculative_sampling_target_only(*plain, *args, probs)
    sg.tree_speculative_sampling_from_logits(*promised, *args, probs.log(), torch.ones(bs),
                                             torch.zeros(bs, dtype=torch.int64), torch.ones(bs),
                                             parent_first=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, promised))
    tree = published_tree("cpu")  # request 1 links its root to slot 4, then back to slot 1
    probs = F.softmax(published_logits("cpu"), -1)
    call = lambda: sg.tree_speculative_sampling_target_only(  # noqa: E731
        *fresh_outputs(2, 6, 4, "cpu"), *tree.values(), torch.rand(2, 6), torch.rand(2), probs,
        parent_first=True)
    with pytest.raises(ValueError, match="request 1 is not numbered parent-first"):
        call()
    monkeypatch.setattr(sg, "on_host", lambda t: False)
    with pytest.raises(ValueError, match=r"^fused_verify: parents of request 1 is not a valid "
                                         r"tree: node 0 has parent 0 \(the root \(node 0\) must "
                                         r"have parent -1\)$"):
        call()


# ----------------------------------------------------------------------------- tree building


def sglang_draft(bs, topk, depth, gen, vocab=50):
    """Random EAGLE draft results in SGLang's list format: cumulative path probabilities, the
    top-k frontier re-expanded each step."""
    score_list, token_list, parents_list = [], [], []
    first = torch.softmax(torch.randn(bs, vocab, generator=gen) * 2, -1).topk(topk)
    score_list.append(first.values[:, None, :])
    token_list.append(torch.randint(0, 30000, (bs, topk), generator=gen))
    parents_list.append(torch.cat([torch.full((bs, 1), -1), torch.arange(topk).expand(bs, topk)],
                                  1))
    frontier = first.values
    for step in range(1, depth):
        child = torch.softmax(torch.randn(bs, topk, vocab, generator=gen) * 2, -1).topk(topk)
        scores = frontier[:, :, None] * child.values
        score_list.append(scores)
        token_list.append(torch.randint(0, 30000, (bs, topk * topk), generator=gen))
        best = scores.flatten(1).topk(topk)
        parents_list.append(topk + (step - 1) * topk * topk + best.indices)
        frontier = best.values
    return score_list, token_list, parents_list


@pytest.mark.parametrize("mode", [FULL, QLEN, PACKED])
def test_build_tree_matches_oracle(device, mode):
    gen = torch.Generator().manual_seed(61 + mode)
    for trial in range(70):
        bs = 1 + trial % 4
        topk = 1 + int(torch.randint(0, 4, (1,), generator=gen))
        depth = 1 + int(torch.randint(0, 5, (1,), generator=gen))
        count = topk + (depth - 1) * topk * topk
        n = 1 + int(torch.randint(0, min(count, 31) + 1, (1,), generator=gen))
        score_list, _, parents_list = sglang_draft(bs, topk, depth, gen)
        parent_list = torch.cat(parents_list[:-1], 1) if depth > 1 else \
            torch.full((bs, 1), -1, dtype=torch.int64)
        selected = selection(score_list, n) if n > 1 else torch.empty(bs, 0, dtype=torch.int64)
        seq_lens = torch.randint(0, 9, (bs,), generator=gen)
        want = ref.sglang_build_tree(parent_list, selected, seq_lens, topk, n, mode)
        d = lambda t: t.to(device)  # noqa: E731
        tree_mask, positions, links = run_build(d(parent_list), d(selected), d(seq_lens), topk,
                                                depth, n, mode)
        got = (mask_as_list(tree_mask, mode), positions.tolist(), links[0].tolist(),
               links[1].tolist(), links[2].tolist())
        assert got == want, (trial, topk, depth, n)


def test_per_request_budgets_match_sglang_per_request(device):
    """Each request's first ``num_draft_tokens[b]`` slots equal SGLang's tree built for that
    request alone with ``num_verify_tokens = num_draft_tokens[b]``; the padding slots have no
    links, the root's position and token, and self-only mask rows."""
    gen = torch.Generator().manual_seed(71)
    for trial in range(25):
        bs, topk, depth = 1 + trial % 5, 1 + trial % 4, 1 + trial % 5
        count = topk + (depth - 1) * topk * topk
        verified_id = torch.randint(0, 30000, (bs,), generator=gen)
        score_list, token_list, parents_list = sglang_draft(bs, topk, depth, gen)
        budgets = torch.randint(1, count + 2, (bs,), generator=gen)
        n_max = int(budgets.max()) + int(torch.randint(0, 3, (1,), generator=gen))
        seq_lens = torch.randint(0, 9, (bs,), generator=gen)
        d = lambda t: t.to(device)  # noqa: E731
        pool = sg.draft_pool(d(verified_id), [d(s) for s in score_list],
                             [d(t) for t in token_list], [d(p) for p in parents_list])
        out = sg.build_tree_per_request(pool, d(budgets), n_max, d(seq_lens), QLEN)
        mask = out.tree_mask.view(bs, n_max, n_max).cpu()
        parent_list = torch.cat(parents_list[:-1], 1) if depth > 1 else \
            torch.full((bs, 1), -1, dtype=torch.int64)
        flat_tokens = torch.cat(token_list, 1)
        for b in range(bs):
            m = min(int(budgets[b]), count + 1)
            sel = selection([s[b:b + 1] for s in score_list], m) if m > 1 else \
                torch.empty(1, 0, dtype=torch.int64)
            want = ref.sglang_build_tree(parent_list[b:b + 1], sel, seq_lens[b:b + 1], topk, m,
                                         QLEN)
            assert int(out.num_draft_tokens[b]) == m
            assert mask[b, :m, :m].reshape(-1).tolist() == want[0]
            assert out.positions.view(bs, n_max)[b, :m].tolist() == want[1]
            assert out.retrive_next_token[b, :m].tolist() == want[3][0]
            assert out.retrive_next_sibling[b, :m].tolist() == want[4][0]
            tokens = [int(verified_id[b])] + flat_tokens[b, sel[0]].tolist()
            assert out.draft_tokens.view(bs, n_max)[b, :m].tolist() == tokens
            pad = slice(m, n_max)
            assert (out.retrive_next_token[b, pad] == -1).all()
            assert (out.retrive_next_sibling[b, pad] == -1).all()
            assert (out.positions.view(bs, n_max)[b, pad] == seq_lens[b]).all()
            assert (out.draft_tokens.view(bs, n_max)[b, pad] == verified_id[b]).all()
            assert torch.equal(mask[b, pad, pad], torch.eye(n_max - m, dtype=torch.bool))
            assert not mask[b, pad, :m].any()
        assert out.retrive_index.tolist() == torch.arange(bs * n_max).view(bs, n_max).tolist()


def test_per_request_tree_verifies(device):
    """A padded per-request tree goes straight into the verify functions: greedy with a target
    that always predicts the first child's token accepts the first-child chain of each request,
    never a padding slot."""
    gen = torch.Generator().manual_seed(73)
    bs, topk, depth = 3, 3, 4
    verified_id = torch.randint(0, 30000, (bs,), generator=gen)
    score_list, token_list, parents_list = sglang_draft(bs, topk, depth, gen)
    d = lambda t: t.to(device)  # noqa: E731
    pool = sg.draft_pool(d(verified_id), [d(s) for s in score_list], [d(t) for t in token_list],
                         [d(p) for p in parents_list])
    out = sg.build_tree_per_request(pool, d(torch.tensor([2, 9, 5])), 12, d(torch.zeros(bs,
                                    dtype=torch.int64)))
    tokens = out.draft_tokens.view(bs, 12)
    target = torch.full_like(tokens, 7)
    has_child = out.retrive_next_token >= 0
    target[has_child] = tokens.gather(1, out.retrive_next_token.clamp_min(0))[has_child]
    outputs = fresh_outputs(bs, 12, depth + 1, device)
    sg.verify_tree_greedy(*outputs, tokens, out.retrive_index, out.retrive_next_token,
                          out.retrive_next_sibling, target)
    for b in range(bs):
        chain, v = [b * 12], 0
        while int(out.retrive_next_token[b, v]) >= 0:
            v = int(out.retrive_next_token[b, v])
            chain.append(b * 12 + v)
        assert max(chain) < b * 12 + int(out.num_draft_tokens[b])
        assert outputs[1][b].tolist() == chain + [-1] * (depth + 1 - len(chain))
        assert int(outputs[2][b]) == len(chain) - 1


def test_stratify_pool_maps_rows_to_nodes(device):
    """H(P*) is the sum of the row entropies along the root-to-P* path, P* the deepest-level
    node with the highest own probability (score over its parent's score)."""
    gen = torch.Generator().manual_seed(81)
    bs, topk, depth = 4, 3, 4
    verified_id = torch.randint(0, 30000, (bs,), generator=gen)
    score_list, token_list, parents_list = sglang_draft(bs, topk, depth, gen)
    rows = 1 + topk * (depth - 1)
    row_entropy = torch.rand(bs, rows, generator=gen) * 2
    thresholds = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    policy = hx.make_policy(depth, 20)
    d = lambda t: t.to(device)  # noqa: E731
    pool = sg.draft_pool(d(verified_id), [d(s) for s in score_list], [d(t) for t in token_list],
                         [d(p) for p in parents_list])
    strat = sg.stratify_pool(pool, d(row_entropy), topk, d(thresholds), d(policy))
    scores = torch.cat([s.flatten(1) for s in score_list], 1)
    parent_rows = torch.cat(parents_list[:-1], 1)
    deepest = range(topk + (depth - 2) * topk * topk, scores.shape[1])
    for b in range(bs):
        def parent(f):
            row = f // topk
            return -1 if row == 0 else int(parent_rows[b, row])

        own = {f: float(scores[b, f]) / (float(scores[b, parent(f)]) if parent(f) >= 0 else 1.0)
               for f in deepest}
        best = max(own, key=lambda f: (own[f], -f))
        entropy, f = 0.0, best
        while f >= 0:
            entropy += float(row_entropy[b, f // topk])
            f = parent(f)
        assert int(strat.pstar[b]) == best + 1
        assert float(strat.path_entropy[b]) == pytest.approx(entropy, rel=1e-5)
        stratum = int((thresholds <= float(strat.path_entropy[b])).sum())
        assert int(strat.stratum[b]) == stratum
        assert int(strat.top_n[b]) == int(policy[stratum, 1])


# ----------------------------------------------------------------------------- malformed input


def verify_args(device, **changes):
    """Valid greedy arguments for the published tree, with some replaced."""
    tree = published_tree(device)
    args = dict(zip(("predicts", "accept_index", "accept_token_num"),
                    fresh_outputs(2, 6, 4, device)))
    args.update(candidates=tree["candidates"], retrive_index=tree["retrive_index"],
                retrive_next_token=tree["retrive_next_token"],
                retrive_next_sibling=tree["retrive_next_sibling"],
                target_predict=published_logits(device).argmax(-1))
    args.update(changes)
    return args


def with_entry(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def test_malformed_links_raise():
    nt = published_tree("cpu")["retrive_next_token"]
    ns = published_tree("cpu")["retrive_next_sibling"]
    cases = {
        "cycle": (dict(retrive_next_token=with_entry(nt, (1, 3), 2)),
                  r"retrive_next_token: request 1: the links form a cycle through nodes "
                  r"2 -> 3 -> 2"),
        "detached_cycle": (dict(retrive_next_sibling=with_entry(ns, (0, 1), -1),
                                retrive_next_token=with_entry(nt, (0, 5), 3)),
                           r"request 0: the links form a cycle through nodes 3 -> 4 -> 5 -> 3"),
        "cycle_through_siblings": (dict(retrive_next_sibling=with_entry(ns, (0, 3), 1)),
                                   r"retrive_next_sibling.*request 0: the links form a cycle"),
        "link_out_of_range": (dict(retrive_next_token=with_entry(nt, (0, 2), 6)),
                              r"retrive_next_token: request 0: node 2 links to 6, outside "
                              r"\[-1, 6\)"),
        "negative_link": (dict(retrive_next_sibling=with_entry(ns, (1, 2), -2)),
                          r"retrive_next_sibling: request 1: node 2 links to -2"),
        "link_to_root_from_reached_node": (dict(retrive_next_token=with_entry(nt, (0, 5), 0)),
                                           r"request 0: the links form a cycle through nodes 0 "
                                           r"-> 1 -> 3 -> 4 -> 5 -> 0"),
        "link_to_root_from_detached_node": (dict(retrive_next_sibling=with_entry(ns, (0, 1), -1),
                                                 retrive_next_token=with_entry(nt, (0, 3), 0)),
                                            r"retrive_next_token: request 0: node 3 links to the "
                                            r"root"),
        "reached_twice": (dict(retrive_next_sibling=with_entry(ns, (0, 4), 5)),
                          r"request 0: node 5 is reached twice"),
        "retrive_index_out_of_range": (dict(retrive_index=with_entry(
            published_tree("cpu")["retrive_index"], (1, 3), 12)),
            r"retrive_index\[1, 3\] = 12 is outside \[0, 12\)"),
        "retrive_index_repeated": (dict(retrive_index=with_entry(
            published_tree("cpu")["retrive_index"], (1, 3), 2)),
            r"retrive_index\[0, 2\] and retrive_index\[1, 3\] both hold 2"),
    }
    for name, (changes, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            sg.verify_tree_greedy(**verify_args("cpu", **changes))
        print(name, "raised")


def test_malformed_requests_reach_the_op_as_invalid_trees(monkeypatch):
    """Without host reads (the CUDA path) a malformed request is handed to fused_verify as an
    invalid tree - which the CUDA op answers with an empty result - and only that request; the
    CPU op, reached the same way, names it."""
    monkeypatch.setattr(sg, "on_host", lambda t: False)
    nt = published_tree("cpu")["retrive_next_token"]
    ri = published_tree("cpu")["retrive_index"]
    for changes, bad_request in ((dict(retrive_next_token=with_entry(nt, (1, 3), 2)), 1),
                                 (dict(retrive_next_token=with_entry(nt, (0, 2), 9)), 0),
                                 (dict(retrive_index=with_entry(ri, (1, 0), -4)), 1)):
        with pytest.raises(ValueError, match=rf"^fused_verify: parents of request {bad_request} "
                                             rf"is not a valid tree: node 0 has parent 0 "):
            sg.verify_tree_greedy(**verify_args("cpu", **changes))


def test_wrong_dtypes_and_shapes_raise():
    cases = [
        (dict(candidates=published_tree("cpu")["candidates"].int()), TypeError,
         "candidates must have dtype int64, got int32"),
        (dict(predicts=torch.zeros(12, dtype=torch.int64)), TypeError,
         "predicts must have dtype int32"),
        (dict(accept_index=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "accept_index"),
        (dict(retrive_next_sibling=published_tree("cpu")["retrive_next_sibling"].float()),
         TypeError, "retrive_next_sibling must have dtype int64"),
        (dict(target_predict=torch.zeros(2, 5, dtype=torch.int64)), ValueError,
         r"target_predict must have shape \[2, 6\], got \[2, 5\]"),
        (dict(predicts=torch.zeros(11, dtype=torch.int32)), ValueError,
         r"predicts must have shape \[12\]"),
        (dict(retrive_index=[[0] * 6] * 2), TypeError, "retrive_index must be a torch.Tensor"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            sg.verify_tree_greedy(**verify_args("cpu", **changes))


def sampling_call(fn, **changes):
    tree = published_tree("cpu")
    probs = F.softmax(published_logits("cpu"), -1)
    args = dict(zip(("predicts", "accept_index", "accept_token_num"),
                    fresh_outputs(2, 6, 4, "cpu")))
    args.update(candidates=tree["candidates"], retrive_index=tree["retrive_index"],
                retrive_next_token=tree["retrive_next_token"],
                retrive_next_sibling=tree["retrive_next_sibling"],
                uniform_samples=torch.rand(2, 6), uniform_samples_for_final_sampling=torch.rand(2))
    if fn is sg.tree_speculative_sampling_target_only:
        args.update(target_probs=probs)
    else:
        args.update(target_logits=published_logits("cpu"), temperatures=torch.ones(2),
                    top_ks=torch.zeros(2, dtype=torch.int64), top_ps=torch.ones(2))
    args.update(changes)
    fn(**args)


def test_sampling_bad_values_raise():
    probs = F.softmax(published_logits("cpu"), -1)
    target_only, from_logits = sg.tree_speculative_sampling_target_only, \
        sg.tree_speculative_sampling_from_logits
    cases = [
        (target_only, dict(target_probs=probs.double()), TypeError,
         "target_probs must have dtype float32"),
        (target_only, dict(uniform_samples=with_entry(torch.rand(2, 6), (0, 1), 1.0)),
         ValueError, r"uniform_samples\[0, 1\] = 1.0 must lie in \[0, 1\)"),
        (target_only, dict(uniform_samples_for_final_sampling=torch.tensor([0.5, -0.1])),
         ValueError, r"uniform_samples_for_final_sampling\[1\]"),
        (target_only, dict(target_probs=with_entry(probs, (1, 4), float("nan"))), ValueError,
         r"target_probs: request 1 node 4: the row must hold finite probabilities"),
        (target_only, dict(candidates=with_entry(published_tree("cpu")["candidates"], (0, 3),
                                                 20)),
         ValueError, r"candidates\[0, 3\] = 20 is outside \[0, 20\)"),
        (from_logits, dict(temperatures=torch.tensor([1.0, -0.5])), ValueError,
         r"temperatures\[1\] = -0.5 must be finite and >= 0"),
        (from_logits, dict(top_ps=torch.tensor([0.0, 1.0])), ValueError,
         r"top_ps\[0\] = 0.0 must lie in \(0, 1\]"),
        (from_logits, dict(top_ks=torch.ones(2)), TypeError, "top_ks must have dtype int32 or"),
        (from_logits, dict(temperatures=torch.ones(3)), ValueError,
         r"temperatures must have shape \[2\] or \[2, 1\]"),
        (from_logits, dict(target_logits=with_entry(published_logits("cpu"), (1, 4, 3),
                                                    float("inf"))), ValueError,
         r"target_logits: request 1 node 4: the row holds NaN or \+inf"),
        (from_logits, dict(target_logits=torch.zeros(2, 6, 20, dtype=torch.float64)),
         TypeError, "target_logits must have dtype"),
    ]
    for fn, changes, error, message in cases:
        with pytest.raises(error, match=message):
            sampling_call(fn, **changes)


def test_build_tree_bad_input_raises():
    _, score_list, _, parents_list = eagle_lists("cpu")
    seq_lens = torch.tensor(EAGLE_SEQ_LENS)
    parent_list = torch.cat(parents_list[:-1], 1)
    sel = selection(score_list, 8)
    cases = [
        (dict(selected_index=sel.flip(1)), "selected_index.*strictly ascending"),
        (dict(selected_index=with_entry(sel, (0, 6), 99)),
         r"selected_index\[0, 6\] = 99 is outside .* = \[0, 52\)"),
        (dict(selected_index=with_entry(sel, (1, 0), 1)), r"selected_index\[1, 1\].*its parent"
                                                          r".*is not selected"),
        (dict(parent_list=parent_list.int()), "parent_list must have dtype int64"),
        (dict(tree_mask=torch.ones(10, dtype=torch.bool)),
         r"tree_mask must hold sum\(verified_seq_len\) \* 8 \+ 2 \* 8\^2 = 248 entries"),
        (dict(tree_mask_mode=QLEN, tree_mask=torch.ones(128, dtype=torch.int32)),
         "tree_mask must have dtype bool"),
        (dict(tree_mask_mode=PACKED, tree_mask=torch.zeros(16, dtype=torch.uint16)),
         "tree_mask must have dtype uint8 or int8"),
        (dict(tree_mask_mode=5), "tree_mask_mode must be FULL_MASK"),
    ]
    for changes, message in cases:
        args = dict(parent_list=parent_list, selected_index=sel, verified_seq_len=seq_lens,
                    tree_mask=torch.ones(248, dtype=torch.bool),
                    positions=torch.empty(16, dtype=torch.int64),
                    retrive_index=torch.empty(2, 8, dtype=torch.int64),
                    retrive_next_token=torch.empty(2, 8, dtype=torch.int64),
                    retrive_next_sibling=torch.empty(2, 8, dtype=torch.int64),
                    topk=4, depth=4, draft_token_num=8, tree_mask_mode=FULL)
        args.update(changes)
        with pytest.raises((ValueError, TypeError), match=message):
            sg.build_tree_kernel_efficient(**args)
    with pytest.raises(ValueError, match="at most 32 nodes"):
        sg.build_tree_per_request(sg.draft_pool(*eagle_lists("cpu")), torch.tensor([8, 8]), 33,
                                  seq_lens, PACKED)


def test_empty_batch():
    out = fresh_outputs(0, 4, 3, "cpu")
    empty = torch.empty(0, 4, dtype=torch.int64)
    sg.verify_tree_greedy(*out, empty, empty, empty, empty, empty)
    sg.tree_speculative_sampling_target_only(*out, empty, empty, empty, empty,
                                             torch.empty(0, 4), torch.empty(0),
                                             torch.empty(0, 4, 7))
    assert out[0].numel() == 0 and out[1].shape == (0, 3)


# ----------------------------------------------------------------------------- install


def test_install_replaces_and_restores(monkeypatch):
    """A stand-in sgl_kernel module and an sglang module that imported its functions by name
    (as build_eagle_tree.py does) both reach heterospec's functions until uninstall()."""
    fake = types.ModuleType("sgl_kernel")
    originals = {name: (lambda *a, **k: "sglang") for name in sg.DROP_INS}
    for name, fn in originals.items():
        setattr(fake, name, fn)
    user = types.ModuleType("sglang.srt.speculative.fake_eagle")
    user.sgl_build_tree_kernel_efficient = fake.build_tree_kernel_efficient
    user.unrelated = len
    monkeypatch.setitem(sys.modules, user.__name__, user)
    handle = sg.install(fake)
    for name in sg.DROP_INS:
        assert getattr(fake, name) is getattr(sg, name)
    assert user.sgl_build_tree_kernel_efficient is sg.build_tree_kernel_efficient
    assert user.unrelated is len
    assert "sglang.srt.speculative.fake_eagle.sgl_build_tree_kernel_efficient" in handle.rebound
    out = fresh_outputs(2, 6, 4, "cpu")  # the swapped-in function really runs
    tree = published_tree("cpu")
    fake.verify_tree_greedy(*out, tree["candidates"], tree["retrive_index"],
                            tree["retrive_next_token"], tree["retrive_next_sibling"],
                            published_logits("cpu").argmax(-1))
    assert out[2].tolist() == PUBLISHED_ACCEPT_TOKEN_NUM
    handle.uninstall()
    for name, fn in originals.items():
        assert getattr(fake, name) is fn
    assert user.sgl_build_tree_kernel_efficient is originals["build_tree_kernel_efficient"]


def test_install_without_sgl_kernel_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sgl_kernel", None)  # makes `import sgl_kernel` fail
    with pytest.raises(ImportError, match="'sgl_kernel' is not importable"):
        sg.install()


# ----------------------------------------------------------------------------- statistics
# A 7-slot SGLang tree numbered out of order: root -> slots 5, 2, 6 (link order; slot 6 repeats
# slot 5's token), slot 5 -> slots 3, 1; slot 4 is outside the tree. The target's logits after a
# node are a fixed function of the node's token path, so the first two emitted tokens have the
# exact law p0(y1) * p1(y2 | y1) (p: processed target distributions). A request that emits one
# token draws y2 exactly from p1(. | y1).

STAT_TRIALS, STAT_CHUNK, STAT_VOCAB = 100_000, 25_000, 7
STAT_NEXT_TOKEN = [5, -1, -1, -1, -1, 3, -1]
STAT_NEXT_SIBLING = [-1, -1, 6, 1, -1, 2, -1]


class PathModel(TokenPathTarget):
    """The target plus the tree's slot tokens (top tokens of p0, then of p1 after the first)
    and the logits row of every slot."""

    def __init__(self, seed, temperature, top_k, top_p):
        super().__init__(seed, STAT_VOCAB, temperature, top_k, top_p)
        first, second = torch.argsort(self.p0, descending=True)[:2].tolist()
        deep = torch.argsort(self.p1[first], descending=True)[:2].tolist()
        # slot tokens: 5 = first, 2 = second, 6 = first again, 3 / 1 = children of slot 5
        self.tokens = [0, deep[1], second, deep[0], 0, first, first]
        self.rows = torch.stack([self.l0, self.l2[first, deep[1]], self.l1[second],
                                 self.l2[first, deep[0]], torch.zeros(STAT_VOCAB),
                                 self.l1[first], self.l1[first]])


def sample_first_two(model, batch, gen, via_probs=False):
    """One verification per request through the adapter; returns (y1, y2, accepted two levels)."""
    n = len(model.tokens)
    expand = lambda row: torch.tensor(row).expand(batch, n).contiguous()  # noqa: E731
    tree = dict(candidates=expand(model.tokens), retrive_index=torch.arange(batch * n).view(
        batch, n), retrive_next_token=expand(STAT_NEXT_TOKEN),
        retrive_next_sibling=expand(STAT_NEXT_SIBLING))
    coins, final = torch.rand(batch, n, generator=gen), torch.rand(batch, generator=gen)
    out = fresh_outputs(batch, n, 3, "cpu")
    if via_probs:
        probs = torch.stack([ref.processed_probs(r.double(), *model.params) for r in model.rows])
        sg.tree_speculative_sampling_target_only(*out, *tree.values(), coins, final,
                                                 probs.float().expand(batch, n, -1).contiguous())
    else:
        t, k, p = model.params
        sg.tree_speculative_sampling_from_logits(
            *out, *tree.values(), coins, final, model.rows.expand(batch, n, -1).contiguous(),
            torch.full((batch,), t), torch.full((batch,), k), torch.full((batch,), p))
    predicts, accept_index, accepted = out
    y1 = predicts[accept_index[:, 0].long()].long()
    y2 = predicts[accept_index[:, 1].clamp_min(0).long()].long()
    fresh = accepted == 0
    y2[fresh] = torch.multinomial(model.p1[y1[fresh]], 1, generator=gen)[:, 0]
    return y1, y2, accepted == 2


def path_counts(model, seed, via_probs=False):
    """Joint counts of the first two tokens and how many requests accepted two levels."""
    return joint_counts(lambda batch, gen: sample_first_two(model, batch, gen, via_probs),
                        STAT_VOCAB, STAT_TRIALS, STAT_CHUNK, seed)


STAT_CASES = {"T1": (5, 1.0, 0, 1.0), "T07_topk_topp": (6, 0.7, 5, 0.9)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STAT_CASES))
@pytest.mark.parametrize("path", ["from_logits", "target_only"])
def test_sampling_matches_exact_target_law(case, path):
    seed, *params = STAT_CASES[case]
    model = PathModel(seed, *params)
    joint, deep = path_counts(model, 500, via_probs=path == "target_only")
    assert_matches_exact_law(joint, model.joint(), STAT_TRIALS)
    assert deep > STAT_TRIALS // 50, "depth-2 acceptances must occur, or level 2 goes untested"


def parent_coin_for_every_sibling(uniform_samples, final_samples, tree):
    """Planted bug: every child tested with its parent's coin (SGLang's coin, our test)."""
    parent = tree.order.gather(1, tree.parents.clamp_min(0))
    coins = uniform_samples.gather(1, parent)
    coins[:, :1] = final_samples[:, None]
    return coins.contiguous()


def final_draw_reuses_root_coin(uniform_samples, final_samples, tree):
    """Planted bug: the final draw reads the root's coin, already used by its first child."""
    coins = ORIGINAL_NODE_UNIFORMS(uniform_samples, final_samples, tree)
    coins[:, :1] = uniform_samples[:, :1]
    return coins


ORIGINAL_NODE_UNIFORMS = sg._node_uniforms


@pytest.mark.slow
@pytest.mark.parametrize("bug", [parent_coin_for_every_sibling, final_draw_reuses_root_coin],
                         ids=lambda f: f.__name__)
def test_planted_coin_bugs_are_rejected(monkeypatch, bug):
    model = PathModel(*STAT_CASES["T1"])
    monkeypatch.setattr(sg, "_node_uniforms", bug)
    joint, _ = path_counts(model, 600)
    p_value = chi_square(joint, model.joint(), STAT_TRIALS)
    assert p_value < 1e-6, f"planted bug {bug.__name__} not detected: p = {p_value}"
