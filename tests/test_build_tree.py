"""build_tree: best-first selection, tree description, invariants, layouts, errors."""
import zlib
from types import SimpleNamespace

import pytest
import torch

import heterospec_ext as hx
from heterospec_ext.testing import eagle_pool, raises_exactly, random_parents
from heterospec_ext import reference as ref


OP = torch.ops.heterospec.build_tree.default
OP_OUT = torch.ops.heterospec.build_tree_out.default


# ----------------------------------------------------------------------------- pool builders


def monotone_scores(parents, gen):
    """Cumulative log-probs: a child never scores above its parent."""
    batch, num_pool = parents.shape
    step = -torch.rand(batch, num_pool, generator=gen) * 3
    scores = torch.zeros(batch, num_pool)
    for i in range(1, num_pool):
        scores[:, i] = scores.gather(1, parents[:, i:i + 1].clamp_min(0)).squeeze(1) + step[:, i]
    return scores


def make_scores(parents, style, gen):
    batch, num_pool = parents.shape
    if style == "monotone":
        return monotone_scores(parents, gen)
    if style == "random":  # not monotone: children may outscore parents
        return torch.randn(batch, num_pool, generator=gen)
    if style == "ties":  # three distinct values (and signed zeros): ties go to the lower index
        scores = -torch.randint(0, 3, (batch, num_pool), generator=gen).float()
        return torch.where(torch.rand(batch, num_pool, generator=gen) < 0.2, -scores, scores)
    if style == "nan":  # NaN counts as -inf; +-inf too
        scores = torch.randn(batch, num_pool, generator=gen)
        u = torch.rand(batch, num_pool, generator=gen)
        scores[u < 0.2] = float("nan")
        scores[(u >= 0.2) & (u < 0.3)] = float("-inf")
        scores[(u >= 0.3) & (u < 0.35)] = float("inf")
        return scores
    raise ValueError(style)


def random_top_n(batch, num_pool, n_max, gen):
    """Mix of in-range values and values to clamp (0, negative, > pool, > n_max)."""
    top_n = torch.randint(1, max(2, min(num_pool, n_max) + 1), (batch,), generator=gen)
    extremes = torch.tensor([1, 0, -5, num_pool + 3, n_max + 1, 10**12])
    pick = torch.rand(batch, generator=gen) < 0.4
    return torch.where(pick, extremes[torch.randint(0, 6, (batch,), generator=gen)], top_n)


def seeded(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# ----------------------------------------------------------------------------- checks


def assert_matches_reference(args, out):
    expected = ref.build_tree(*[a.cpu() if torch.is_tensor(a) else a for a in args])
    for name, got, want in zip(hx.Tree._fields, out, expected):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.cpu(), want), f"{name}:\n got {got.cpu()}\nwant {want}"


def pack(mask):
    """[.., n] bool -> [.., ceil(n/32)] int32, bit j % 32 of word j // 32 (little-endian)."""
    n = mask.shape[-1]
    words = (n + 31) // 32
    padded = torch.zeros(*mask.shape[:-1], words * 32, dtype=torch.int64)
    padded[..., :n] = mask.to(torch.int64)
    weights = torch.tensor([1 << j for j in range(32)], dtype=torch.int64)
    packed = (padded.view(*mask.shape[:-1], words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def assert_invariants(pool_parents, pool_scores, pool_tokens, top_n, n_max, out):
    """Structural properties that hold independently of the reference implementation."""
    out = hx.Tree(*[t.cpu() for t in out])
    assert torch.equal(out.packed_mask, pack(out.mask))
    for b in range(pool_parents.shape[0]):
        par = pool_parents[b].tolist()
        valid = 1 + sum(p >= 0 for p in par[1:])
        n = int(out.num_nodes[b])
        assert n == max(1, min(int(top_n[b]), n_max, valid))
        sel = out.selected[b].tolist()
        assert sel[0] == 0 and sel[:n] == sorted(set(sel[:n])) and sel[n:] == [-1] * (n_max - n)
        assert out.tokens[b].tolist() == [int(pool_tokens[b, s]) for s in sel[:n]] + [-1] * (
            n_max - n)
        parents = out.parents[b].tolist()
        assert parents[0] == -1 and parents[n:] == [-1] * (n_max - n)
        for j in range(1, n):
            assert 0 <= parents[j] < j and sel[parents[j]] == par[sel[j]]
            assert out.depth[b, j] == out.depth[b, parents[j]] + 1
        assert out.depth[b, 0] == 0 and out.depth[b, n:].eq(0).all()
        # Mask = ancestor-or-self closure; padding rows self only.
        closure = torch.zeros(n_max, n_max, dtype=torch.bool)
        for i in range(n_max):
            v = i
            while v >= 0:
                closure[i, v] = True
                v = parents[v] if i < n else -1
        assert torch.equal(out.mask[b], closure)
        # Children lists: increasing index, exactly the nodes naming that parent.
        for j in range(n_max):
            kids, c = [], int(out.first_child[b, j])
            while c != -1 and len(kids) <= n_max:
                kids.append(c)
                c = int(out.next_sibling[b, c])
            assert kids == [k for k in range(n) if parents[k] == j], (b, j)
        # Retrieve: one root-to-leaf chain per leaf, leaves in increasing order.
        leaves = [j for j in range(n) if j not in parents[:n]]
        rows = out.retrieve[b].tolist()
        for r, row in enumerate(rows):
            path = [v for v in row if v != -1]
            if r >= len(leaves):
                assert path == []
                continue
            assert row[:len(path)] == path and path[0] == 0 and path[-1] == leaves[r]
            assert all(parents[path[t + 1]] == path[t] for t in range(len(path) - 1))
        # Selection: an independent best-first by rounds of masked argmax (the GPU's scheme).
        assert sel[:n] == best_first_by_rounds(pool_parents[b], pool_scores[b], n)


def best_first_by_rounds(par, scores, n):
    """n - 1 rounds of: take the best node (NaN as -inf, ties to the lower index) whose parent is
    taken. Returns the taken pool indices in ascending order."""
    scores = torch.where(scores.isnan(), float("-inf"), scores.double())
    taken = torch.zeros(par.shape[0], dtype=torch.bool)
    taken[0] = True
    for _ in range(n - 1):
        selectable = (par >= 0) & ~taken & taken[par.clamp_min(0)]
        best = scores[selectable].max()
        taken[int((selectable & (scores == best)).to(torch.int8).argmax())] = True
    return taken.nonzero().flatten().tolist()


def run_and_check(device, pool_parents, pool_scores, pool_tokens, top_n, n_max):
    args = [t.to(device) for t in (pool_parents, pool_scores, pool_tokens, top_n)] + [n_max]
    out = hx.build_tree(*args)
    assert all(t.device.type == device.type for t in out)
    assert_matches_reference(args, out)
    assert_invariants(pool_parents, pool_scores, pool_tokens, top_n, n_max, out)
    return out


# ----------------------------------------------------------------------------- reference checks


@pytest.mark.parametrize("kind", ["chain", "star", "deep", "bushy"])
@pytest.mark.parametrize("style", ["monotone", "random", "ties", "nan"])
@pytest.mark.parametrize("batch,num_pool,n_max", [(1, 1, 1), (7, 7, 7), (7, 111, 33), (3, 111, 65)])
def test_matches_reference(device, kind, style, batch, num_pool, n_max):
    gen = seeded(kind, style, batch, num_pool, n_max)
    pool_parents = random_parents(kind, batch, num_pool, gen, padding=0.15)
    pool_scores = make_scores(pool_parents, style, gen)
    pool_tokens = torch.randint(0, 128256, (batch, num_pool), generator=gen)
    top_n = random_top_n(batch, num_pool, n_max, gen)
    run_and_check(device, pool_parents, pool_scores, pool_tokens, top_n, n_max)


@pytest.mark.slow
@pytest.mark.parametrize("n_max", [64, 65])
def test_large_batch_and_pool(device, n_max):
    gen = seeded("large", n_max)
    pool_parents = random_parents("bushy", 83, 1013, gen, padding=0.05)
    pool_scores = make_scores(pool_parents, "random", gen)
    pool_tokens = torch.randint(0, 128256, (83, 1013), generator=gen)
    top_n = random_top_n(83, 1013, n_max, gen)
    args = [t.to(device) for t in (pool_parents, pool_scores, pool_tokens, top_n)] + [n_max]
    assert_matches_reference(args, hx.build_tree(*args))


@pytest.mark.parametrize("n_max", [1, 7, 32, 64, 65])
def test_eagle_pool_is_global_top_n(device, n_max):
    """Monotone scores: best-first equals EAGLE's global top-(N-1) then sort."""
    gen = seeded("eagle", n_max)
    k, depth, batch = 10, 7, 8
    pool_parents, pool_scores = eagle_pool(batch, k, depth, gen)
    pool_tokens = torch.randint(0, 128256, pool_parents.shape, generator=gen)
    top_n = torch.tensor([1, 2, 10, 22, 39, 60, 62, 711])
    out = run_and_check(device, pool_parents, pool_scores, pool_tokens, top_n, n_max)
    for b in range(batch):
        n = int(out.num_nodes[b])
        row = pool_scores[b].tolist()
        order = sorted(range(1, len(row)), key=lambda i: (-row[i], i))
        assert out.selected[b, :n].tolist() == [0] + sorted(order[:n - 1])


def test_hand_computed(device):
    #         0
    #       /   \
    #      1     2          slot 6 is padding
    #     / \     \
    #    3   4     5
    #    |
    #    7
    pool_parents = torch.tensor([[-1, 0, 0, 1, 1, 2, -1, 3]])
    pool_scores = torch.tensor([[0.0, -1.0, -2.0, -1.5, -3.0, -2.5, 5.0, -1.6]])
    pool_tokens = torch.tensor([[100, 101, 102, 103, 104, 105, 106, 107]])
    out = run_and_check(device, pool_parents, pool_scores, pool_tokens, torch.tensor([5]), 7)
    # Best-first: 1 (-1.0), 3 (-1.5), 7 (-1.6), 2 (-2.0); never the padding slot.
    assert out.selected.tolist() == [[0, 1, 2, 3, 7, -1, -1]]
    assert out.tokens.tolist() == [[100, 101, 102, 103, 107, -1, -1]]
    assert out.parents.tolist() == [[-1, 0, 0, 1, 3, -1, -1]]
    assert out.depth.tolist() == [[0, 1, 1, 2, 3, 0, 0]]
    assert out.first_child.tolist() == [[1, 3, -1, 4, -1, -1, -1]]
    assert out.next_sibling.tolist() == [[-1, 2, -1, -1, -1, -1, -1]]
    assert out.packed_mask[0, :, 0].tolist() == [0b1, 0b11, 0b101, 0b1011, 0b11011, 1 << 5,
                                                1 << 6]
    assert out.retrieve[0, :3].tolist() == [[0, 2, -1, -1, -1, -1, -1],
                                            [0, 1, 3, 4, -1, -1, -1],
                                            [-1] * 7]
    assert out.num_nodes.tolist() == [5]


def test_non_monotone_takes_parent_first(device):
    # Node 3 has the best score but sits under node 1, which is the worst root child.
    pool_parents = torch.tensor([[-1, 0, 0, 1]])
    pool_scores = torch.tensor([[0.0, -9.0, -1.0, 10.0]])
    out = run_and_check(device, pool_parents, pool_scores, torch.arange(4)[None],
                        torch.tensor([3]), 4)
    assert out.selected.tolist() == [[0, 1, 2, -1]]  # 2 first, then 1 (3 still needs 1)
    out = run_and_check(device, pool_parents, pool_scores, torch.arange(4)[None],
                        torch.tensor([4]), 4)
    assert out.selected.tolist() == [[0, 1, 2, 3]]


def test_ties_and_nan(device):
    # Equal scores go to the lower index; -0.0 equals 0.0; NaN is -inf but still selectable.
    pool_parents = torch.tensor([[-1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]])
    pool_scores = torch.tensor([[0.0, -1.0, float("nan"), -1.0, -1.0],
                                [0.0, float("nan"), -0.0, float("-inf"), 0.0]])
    out = run_and_check(device, pool_parents, pool_scores, torch.zeros(2, 5, dtype=torch.int64),
                        torch.tensor([3, 4]), 5)
    assert out.selected.tolist() == [[0, 1, 3, -1, -1], [0, 1, 2, 4, -1]]


def test_root_only_tree_and_all_padding(device):
    pool_parents = torch.tensor([[-1, -1, -1], [-1, 0, -1]])
    out = run_and_check(device, pool_parents, torch.zeros(2, 3),
                        torch.tensor([[7, 8, 9], [4, 5, 6]]), torch.tensor([5, 5]), 4)
    assert out.num_nodes.tolist() == [1, 2]
    assert out.retrieve[0, 0].tolist() == [0, -1, -1, -1]
    assert out.retrieve[1, 0].tolist() == [0, 1, -1, -1]
    out = run_and_check(device, torch.full((2, 1), -1), torch.zeros(2, 1),
                        torch.tensor([[3], [4]]), torch.tensor([1, 9]), 1)
    assert out.tokens.tolist() == [[3], [4]] and out.mask.tolist() == [[[True]], [[True]]]


def test_deep_chain_retrieve_spans_n_max(device):
    n_max = 65
    pool_parents = random_parents("chain", 2, 100, None)
    out = run_and_check(device, pool_parents, monotone_scores(pool_parents, seeded("chain")),
                        torch.arange(100).expand(2, 100), torch.tensor([65, 64]), n_max)
    assert out.retrieve[0, 0].tolist() == list(range(65))
    assert out.retrieve[1, 0].tolist() == list(range(64)) + [-1]
    assert out.packed_mask[0, 64].tolist() == [-1, -1, 1]


# ----------------------------------------------------------------------------- layouts, out, opcheck


def test_non_contiguous_inputs(device):
    gen = seeded("strided")
    pool_parents = random_parents("bushy", 5, 60, gen, padding=0.1).to(device)
    pool_scores = make_scores(pool_parents.cpu(), "random", gen).to(device)
    pool_tokens = torch.randint(0, 1000, (5, 60), generator=gen).to(device)
    top_n = torch.tensor([1, 5, 17, 33, 60]).to(device)
    strided = [torch.stack([t, t], -1)[..., 1] for t in (pool_parents, pool_scores, pool_tokens,
                                                          top_n)]
    assert not strided[0].is_contiguous() and not strided[3].is_contiguous()
    assert_matches_reference(strided + [33], hx.build_tree(*strided, 33))


def test_out_variant_overwrites_buffers(device):
    gen = seeded("out")
    batch, n_max = 6, 40
    pool_parents = random_parents("deep", batch, 90, gen, padding=0.1)
    args = [t.to(device) for t in (pool_parents, make_scores(pool_parents, "random", gen),
                                   torch.randint(0, 9, (batch, 90), generator=gen),
                                   random_top_n(batch, 90, n_max, gen))]
    expected = hx.build_tree(*args, n_max)
    outs = [torch.full_like(t, 77) if t.dtype != torch.bool else torch.ones_like(t)
            for t in expected]
    assert hx.build_tree_out(*args, *outs) is None
    for name, got, want in zip(hx.Tree._fields, outs, expected):
        assert torch.equal(got, want), name


def test_empty_batch(device):
    i64 = dict(dtype=torch.int64, device=device)
    out = hx.build_tree(torch.zeros(0, 5, **i64), torch.zeros(0, 5, device=device),
                        torch.zeros(0, 5, **i64), torch.zeros(0, **i64), 3)
    assert out.mask.shape == (0, 3, 3) and out.packed_mask.shape == (0, 3, 1)


def test_opcheck(device):
    gen = seeded("opcheck")
    pool_parents = random_parents("bushy", 3, 30, gen)
    args = tuple(t.to(device) for t in (pool_parents, make_scores(pool_parents, "random", gen),
                                        torch.randint(0, 9, (3, 30), generator=gen),
                                        torch.tensor([4, 40, 12])))
    torch.library.opcheck(OP, args + (33,))
    outs = tuple(torch.empty_like(t) for t in OP(*args, 33))
    torch.library.opcheck(OP_OUT, args + outs)


def test_torch_compile_fullgraph(device):
    gen = seeded("compile")
    pool_parents = random_parents("bushy", 2, 20, gen)
    args = [t.to(device) for t in (pool_parents, make_scores(pool_parents, "random", gen),
                                   torch.randint(0, 9, (2, 20), generator=gen),
                                   torch.tensor([4, 9]))]
    compiled = torch.compile(hx.build_tree, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args, 8), hx.build_tree(*args, 8)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- malformed input


MALFORMED_POOLS = {
    "parent_not_below_node": [[-1, 0, 1, 0], [-1, 0, 2, 1]],
    "parent_below_minus_one": [[-1, 0, 1, 0], [-1, 0, -2, 1]],
    "root_parent_not_minus_one": [[-1, 0, 1, 0], [0, 0, 1, 1]],
    "real_node_under_padding": [[-1, 0, 1, 0], [-1, -1, 0, 1]],
    "cycle": [[-1, 0, 1, 0], [-1, 2, 1, 1]],
}


def test_malformed_pool_on_cuda_is_emitted_empty(device):
    if device.type != "cuda":
        pytest.skip("CPU raises instead (test_malformed_pools_raise_on_cpu_and_not_on_cuda)")
    for name, rows in MALFORMED_POOLS.items():
        args = [torch.tensor(rows, device=device), torch.rand(2, 4, device=device),
                torch.arange(8, device=device).view(2, 4), torch.tensor([3, 3], device=device)]
        out = hx.Tree(*[t.cpu() for t in hx.build_tree(*args, 5)])
        assert out.num_nodes.tolist() == [3, 0], name
        for field in ("selected", "tokens", "parents", "first_child", "next_sibling", "retrieve"):
            assert getattr(out, field)[1].eq(-1).all(), (name, field)
        assert out.depth[1].eq(0).all(), name
        assert torch.equal(out.mask[1], torch.eye(5, dtype=torch.bool)), name
        assert torch.equal(out.packed_mask[1], pack(torch.eye(5, dtype=torch.bool))), name
        good = ref.build_tree(*[a.cpu()[:1] for a in args], 5)
        for got, want in zip(out, good):
            assert torch.equal(got[:1], want), name


def _good_inputs(device):
    """Valid build_tree arguments (B = 2, M = 4) and their functional outputs for n_max = 5."""
    x = SimpleNamespace(
        pp=torch.tensor([[-1, 0, 1, 0], [-1, 0, 1, 1]], device=device),
        sc=torch.rand(2, 4, device=device), tk=torch.arange(8, device=device).view(2, 4),
        tn=torch.tensor([2, 3], device=device))
    x.outs = list(hx.build_tree(x.pp, x.sc, x.tk, x.tn, 5))
    return x


def _out_with(x, index, replacement):
    """build_tree_out into x's outputs with output ``index`` replaced."""
    outs = list(x.outs)
    outs[index] = replacement
    hx.build_tree_out(x.pp, x.sc, x.tk, x.tn, *outs)


# name -> (call with the inputs x on device d, text the RuntimeError must hold)
ARGUMENT_ERRORS = {
    "parents_dtype": (lambda x, d: hx.build_tree(x.pp.int(), x.sc, x.tk, x.tn, 5), "pool_parents"),
    "parents_rank": (lambda x, d: hx.build_tree(x.pp[0], x.sc, x.tk, x.tn, 5), "pool_parents"),
    "parents_empty": (lambda x, d: hx.build_tree(x.pp[:, :0], x.sc[:, :0], x.tk[:, :0], x.tn, 5),
                      "pool_parents"),
    "scores_dtype": (lambda x, d: hx.build_tree(x.pp, x.sc.double(), x.tk, x.tn, 5),
                     "pool_scores"),
    "scores_shape": (lambda x, d: hx.build_tree(x.pp, x.sc[:, :3], x.tk, x.tn, 5), "pool_scores"),
    "tokens_dtype": (lambda x, d: hx.build_tree(x.pp, x.sc, x.tk.int(), x.tn, 5), "pool_tokens"),
    "tokens_shape": (lambda x, d: hx.build_tree(x.pp, x.sc, x.tk[:1], x.tn, 5), "pool_tokens"),
    "top_n_dtype": (lambda x, d: hx.build_tree(x.pp, x.sc, x.tk, x.tn.int(), 5), "top_n"),
    "top_n_rank": (lambda x, d: hx.build_tree(x.pp, x.sc, x.tk, x.tn[None], 5), "top_n"),
    "top_n_shape": (lambda x, d: hx.build_tree(x.pp, x.sc, x.tk, x.tn[:1], 5), "top_n"),
    "n_max_zero": (lambda x, d: hx.build_tree(x.pp, x.sc, x.tk, x.tn, 0), "n_max"),
    "n_max_negative": (lambda x, d: hx.build_tree(x.pp, x.sc, x.tk, x.tn, -3), "n_max"),
    "out_selected_empty": (lambda x, d: _out_with(x, 0, torch.empty(2, 0, dtype=torch.int64,
                                                                    device=d)), "n_max"),
    "out_mask_dtype": (lambda x, d: _out_with(x, 4, x.outs[4].int()), "mask"),
    "out_packed_shape": (lambda x, d: _out_with(x, 5, torch.empty(2, 5, 2, dtype=torch.int32,
                                                                  device=d)), "packed_mask"),
    "out_retrieve_shape": (lambda x, d: _out_with(x, 8, torch.empty(2, 5, 4, dtype=torch.int64,
                                                                    device=d)), "retrieve"),
    "out_num_nodes_strided": (lambda x, d: _out_with(x, 9, torch.empty(
        4, dtype=torch.int64, device=d)[::2]), "num_nodes"),
}


@pytest.mark.parametrize("case", ARGUMENT_ERRORS)
def test_argument_errors(device, case):
    call, needle = ARGUMENT_ERRORS[case]
    with raises_exactly(RuntimeError, needle):
        call(_good_inputs(device), device)


def test_inputs_on_two_devices_raise(device):
    if device.type != "cuda":
        pytest.skip("needs a second device type")
    x = _good_inputs(device)
    with raises_exactly(RuntimeError, "same device"):
        hx.build_tree(x.pp, x.sc.cpu(), x.tk, x.tn, 5)


@pytest.mark.parametrize("case", MALFORMED_POOLS)
def test_malformed_pools_raise_on_cpu_and_not_on_cuda(device, case):
    """CPU raises ValueError naming pool_parents and request 1; CUDA, which never syncs to
    raise, returns (test_malformed_pool_on_cuda_is_emitted_empty checks the values)."""
    x = _good_inputs(device)
    pool_parents = torch.tensor(MALFORMED_POOLS[case], device=device)
    if device.type == "cuda":
        hx.build_tree(pool_parents, x.sc, x.tk, x.tn, 5)
        torch.cuda.synchronize()
        return
    with raises_exactly(ValueError, r"^build_tree: pool_parents of request 1 "):
        hx.build_tree(pool_parents, x.sc, x.tk, x.tn, 5)


@pytest.mark.slow
def test_huge_pool_matches_cpu(device):
    """M = 400003: the CUDA selection bitset needs > 48 KiB of shared memory (opt-in path)."""
    gen = seeded("huge")
    num_pool = 400003
    pool_parents = random_parents("bushy", 2, num_pool, gen)
    pool_scores = torch.randn(2, num_pool, generator=gen)
    pool_tokens = torch.randint(0, 128256, (2, num_pool), generator=gen)
    top_n = torch.tensor([64, 17])
    want = hx.build_tree(pool_parents, pool_scores, pool_tokens, top_n, 64)
    got = hx.build_tree(*[t.to(device) for t in (pool_parents, pool_scores, pool_tokens, top_n)],
                        64)
    for name, g, w in zip(hx.Tree._fields, got, want):
        assert torch.equal(g.cpu(), w), name
    assert want.selected[0].tolist() == best_first_by_rounds(pool_parents[0], pool_scores[0], 64)
