"""fused_verify: statistical exactness of the sampling modes.

The target is a small "language model" over a vocabulary of 6-8 tokens whose logits after a node
are a fixed function of that node's token path (root context, one token, two tokens), so the true
distribution of the first two generated tokens is known exactly:
``P(y1, y2) = p_root(y1) * p_{y1}(y2)`` with p the processed (temperature / top-k / top-p)
target distribution. Every trial runs one verification cycle on a depth-2 tree; when the cycle
emits a single token the second one comes from an exact draw of the next cycle (a root-only
tree through the op). A chi-square test compares the observed counts with the exact law.

Both sampling modes are covered: deterministic drafts (fixed tree tokens, duplicates included)
and real draft probabilities (children drawn i.i.d. from q per trial). 100k trials per case
resolve a ~1% total-variation error. The same test must reject planted bugs, implemented below in
a vectorised pure-torch simulator of the walk, which also passes the test when unbugged.
"""
import pytest
import torch

from heterospec_ext import reference as ref
from heterospec_ext.testing import chi_square

OP = torch.ops.heterospec.fused_verify.default
TRIALS = 100_000
CHUNK = 20_000
# fixed tree shape: root -> nodes 1..4, node 1 -> 5, 6; node 2 -> 7
PARENTS = [-1, 0, 0, 0, 0, 1, 1, 2]
DEPTH1 = [1, 2, 3, 4]
CHILDREN = {n: [c for c in range(len(PARENTS)) if PARENTS[c] == n] for n in range(len(PARENTS))}


class Model:
    """Target logits / draft probabilities as functions of the token path, plus the exact
    processed target distributions."""

    def __init__(self, vocab, seed, temperature, top_k, top_p, peak=2.0):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.temperature, self.top_k, self.top_p = vocab, temperature, top_k, top_p
        v = vocab
        self.l0 = torch.randn(v, generator=g) * peak
        self.l1 = torch.randn(v, v, generator=g) * peak
        self.l2 = torch.randn(v, v, v, generator=g) * peak
        self.q0 = torch.softmax(self.l0 + torch.randn(v, generator=g), -1)
        self.q1 = torch.softmax(self.l1 + torch.randn(v, v, generator=g), -1)
        self.q2 = torch.softmax(self.l2 + torch.randn(v, v, v, generator=g), -1)
        proc = lambda x: ref._fv_target_probs(x.double(), temperature, top_k, top_p)  # noqa
        self.p0 = proc(self.l0)
        self.p1 = torch.stack([proc(self.l1[a]) for a in range(v)])
        self.p2 = torch.stack([torch.stack([proc(self.l2[a, b]) for b in range(v)])
                               for a in range(v)])

    def joint(self):
        """Exact [V, V] law of the first two generated tokens."""
        return self.p0[:, None] * self.p1

    def node_rows(self, tokens, l0, l1, l2):
        """[B, N, ...] rows for the fixed tree shape given [B, N] node tokens."""
        b = tokens.shape[0]
        rows = [l0.expand(b, *l0.shape)]
        for c in range(1, len(PARENTS)):
            p = PARENTS[c]
            rows.append(l1[tokens[:, c]] if p == 0 else l2[tokens[:, p], tokens[:, c]])
        return torch.stack(rows, 1)

    def draft_tokens(self, batch, gen, real_q):
        """[B, N] candidates: deterministic drafts (the draft's top tokens, with a duplicate
        sibling at node 3) or i.i.d. samples from q per node."""
        tokens = torch.full((batch, len(PARENTS)), -1, dtype=torch.int64)
        for c in range(1, len(PARENTS)):
            p = PARENTS[c]
            if real_q:
                q = self.q0.expand(batch, -1) if p == 0 else self.q1[tokens[:, p]]
                tokens[:, c] = torch.multinomial(q, 1, generator=gen)[:, 0]
            else:
                sibling_rank = CHILDREN[p].index(c)
                if p == 0:
                    order = torch.argsort(self.q0, descending=True)
                    rank = [0, 1, 0, 2][sibling_rank]  # node 3 repeats node 1's token
                    tokens[:, c] = order[rank]
                else:
                    order = torch.argsort(self.q1[tokens[:, p]], dim=-1, descending=True)
                    tokens[:, c] = order[:, sibling_rank]
        return tokens


def second_token_next_cycle(model, y1, gen):
    """The next cycle's first token: a root-only tree through the op at context y1."""
    b = y1.shape[0]
    logits = model.l1[y1][:, None, :].contiguous()
    none = torch.full((b, 1), -1, dtype=torch.int64)
    out = OP(logits, none, none, torch.full((b,), model.temperature),
             torch.full((b,), model.top_k, dtype=torch.int64), torch.full((b,), model.top_p),
             torch.rand(b, 1, generator=gen), None)
    return out[0][:, 0]


def run_op(model, batch, gen, real_q):
    tokens = model.draft_tokens(batch, gen, real_q)
    logits = model.node_rows(tokens, model.l0, model.l1, model.l2).contiguous()
    q = model.node_rows(tokens, model.q0, model.q1, model.q2).contiguous() if real_q else None
    parents = torch.tensor(PARENTS).expand(batch, -1).contiguous()
    out_tokens, _, num = OP(logits, tokens, parents, torch.full((batch,), model.temperature),
                            torch.full((batch,), model.top_k, dtype=torch.int64),
                            torch.full((batch,), model.top_p),
                            torch.rand(batch, len(PARENTS), generator=gen), q)
    return out_tokens[:, 0], out_tokens[:, 1], num


def simulate(model, batch, gen, real_q, bug=None):
    """Vectorised pure-torch twin of the walk (float64), with optional planted bugs:
    "no_renorm" (deterministic residual not renormalised), "draw_from_p" (final draw from p
    instead of the residual), "skip_dup_real_q" (real-q mode skips duplicate siblings)."""
    tokens = model.draft_tokens(batch, gen, real_q)
    probs = model.node_rows(tokens, model.p0, model.p1, model.p2)
    q_rows = model.node_rows(tokens, model.q0, model.q1, model.q2).double()
    u = torch.rand(batch, len(PARENTS), generator=gen, dtype=torch.float64)
    cur = torch.zeros(batch, dtype=torch.int64)
    done = torch.zeros(batch, dtype=torch.bool)
    emitted = torch.full((batch, 2), -1, dtype=torch.int64)
    count = torch.zeros(batch, dtype=torch.int64)
    rows = torch.arange(batch)

    def emit(mask, tok):
        first = mask & (count == 0)
        second = mask & (count == 1)
        emitted[first, 0] = tok[first]
        emitted[second, 1] = tok[second]
        count[mask] += 1

    for n in range(len(PARENTS)):
        g = ~done & (cur == n)
        if not g.any():
            continue
        r = probs[:, n].clone()
        p_orig = probs[:, n]
        q = q_rows[:, n]
        accepted = torch.full((batch,), -1, dtype=torch.int64)
        seen = []
        for c in CHILDREN[n]:
            x = tokens[:, c]
            still = g & (accepted < 0)
            dup = torch.zeros(batch, dtype=torch.bool)
            for s in seen:
                dup |= tokens[:, s] == x
            seen.append(c)
            rx = r[rows, x]
            if real_q:
                qx = q[rows, x]
                ok = torch.where(qx == 0, rx > 0, u[:, c] < rx / qx.clamp_min(1e-300))
                test = still & ~dup if bug == "skip_dup_real_q" else still
                acc = test & ok
                rej = test & ~ok
                diff = (r - q).clamp_min(0)
                mass = diff.sum(-1, keepdim=True)
                upd = rej & (mass[:, 0] > 0)
                r[upd] = (diff / mass.clamp_min(1e-300))[upd]
            else:
                acc = still & ~dup & (u[:, c] < rx)
                rej = still & ~dup & ~acc
                r[rej, x[rej]] = 0.0
                if bug != "no_renorm":
                    r[rej] = r[rej] / r[rej].sum(-1, keepdim=True)
            accepted[acc] = c
        took = g & (accepted >= 0)
        emit(took, tokens[rows, accepted.clamp_min(0)])
        cur[took] = accepted[took]
        stop = g & (accepted < 0)
        draw_from = p_orig if bug == "draw_from_p" else r
        cum = torch.cumsum(draw_from, -1)
        pick = (cum <= u[:, :1] * cum[:, -1:]).sum(-1).clamp_max(model.vocab - 1)
        emit(stop, pick)
        done |= stop
    y2 = emitted[:, 1].clone()
    need = y2 < 0
    y2[need] = torch.multinomial(model.p1[emitted[need, 0]].float(), 1, generator=gen)[:, 0]
    return emitted[:, 0], y2, count - 1


def collect(model, sampler, seed):
    gen = torch.Generator().manual_seed(seed)
    v = model.vocab
    first = torch.zeros(v, dtype=torch.int64)
    joint = torch.zeros(v * v, dtype=torch.int64)
    accepted = 0
    for _ in range(TRIALS // CHUNK):
        y1, y2, num = sampler(gen)
        first += torch.bincount(y1, minlength=v)
        joint += torch.bincount(y1 * v + y2, minlength=v * v)
        accepted += int(num.sum())
    return first, joint.view(v, v), accepted / TRIALS


CASES = {
    "deterministic_T1": dict(vocab=6, seed=1, temperature=1.0, top_k=0, top_p=1.0, real_q=False),
    "deterministic_T07_topk_topp": dict(vocab=8, seed=2, temperature=0.7, top_k=5, top_p=0.9,
                                        real_q=False),
    "real_q_T1": dict(vocab=6, seed=3, temperature=1.0, top_k=0, top_p=1.0, real_q=True),
    "real_q_T13_topk_topp": dict(vocab=7, seed=4, temperature=1.3, top_k=5, top_p=0.85,
                                 real_q=True),
}


def make_model(case):
    cfg = dict(CASES[case])
    real_q = cfg.pop("real_q")
    return Model(**cfg), real_q


def op_sampler(model, real_q):
    def sample(gen):
        y1, y2, num = run_op(model, CHUNK, gen, real_q)
        need = y2 < 0
        y2 = y2.clone()
        y2[need] = second_token_next_cycle(model, y1[need], gen)
        return y1, y2, num
    return sample


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_exact_target_law(case):
    model, real_q = make_model(case)
    first, joint, mean_accepted = collect(model, op_sampler(model, real_q), seed=100)
    p_first = chi_square(first, model.p0, TRIALS)
    p_joint = chi_square(joint, model.joint(), TRIALS)
    assert p_first > 1e-3 and p_joint > 1e-3, (p_first, p_joint)
    # resolution: the same counts reject a law 1% (total variation) away from the true one
    for counts, law in ((first, model.p0), (joint, model.joint())):
        shifted = law.flatten().clone()
        top2 = torch.topk(shifted, 2).indices
        shifted[top2[0]] -= 0.01
        shifted[top2[1]] += 0.01
        assert chi_square(counts, shifted, TRIALS) < 1e-3
    assert mean_accepted > 0.3, "the tree must accept often, or deep levels go untested"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["deterministic_T1", "real_q_T13_topk_topp"])
def test_unbugged_simulator_passes(case):
    """The pure-torch twin without bugs passes, so the planted-bug failures below are caused by
    the bugs, not by the simulator."""
    model, real_q = make_model(case)
    first, joint, _ = collect(model, lambda g: simulate(model, CHUNK, g, real_q), seed=200)
    assert chi_square(first, model.p0, TRIALS) > 1e-3
    assert chi_square(joint, model.joint(), TRIALS) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("case,bug", [
    ("deterministic_T1", "no_renorm"),
    ("deterministic_T1", "draw_from_p"),
    ("real_q_T1", "draw_from_p"),
    ("real_q_T1", "skip_dup_real_q"),
])
def test_planted_bugs_are_rejected(case, bug):
    model, real_q = make_model(case)
    first, joint, _ = collect(model, lambda g: simulate(model, CHUNK, g, real_q, bug), seed=300)
    p_joint = chi_square(joint, model.joint(), TRIALS)
    assert p_joint < 1e-6, f"planted bug {bug} not detected: p = {p_joint}"
