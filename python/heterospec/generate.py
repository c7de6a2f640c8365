"""The decode loop: draft -> (stratify -> extend) -> build_tree -> tree forward -> fused_verify ->
commit, with per-run statistics. Also the target's own autoregressive loop, the baseline."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, List, Optional

import torch

import heterospec_ext as hx

from .drafter import Drafter, check_same_vocab
from .errors import GenerationConfigError
from .policy import StaticTree
from .target import CausalLM, check_context
from .verifier import fixed_capacity, make_verifier


@dataclass
class SamplingParams:
    """temperature 0 = greedy. top_k <= 0 and top_p = 1 disable those filters. ``seed`` seeds the
    generator that draws each cycle's uniforms, so a run repeats exactly."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = 0

    def check(self):
        if not (self.temperature >= 0.0):
            raise GenerationConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise GenerationConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k:
            raise GenerationConfigError(f"top_k must be an integer, got {self.top_k}")

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


@dataclass
class GenerationStats:
    """Per-run statistics; the field names are part of the ``--json`` output (stable)."""

    method: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    cycles: int = 0  # verification calls (the paper's Calls)
    verified_tokens: int = 0  # tokens the target scored in verification forwards (paper's Tokens)
    accepted_tokens: int = 0  # accepted draft tokens over all cycles
    tau: float = 0.0  # mean (accepted draft tokens + 1) per cycle
    mean_verified_per_cycle: float = 0.0
    stratum_counts: List[int] = field(default_factory=list)  # cycles per stratum (heterospec)
    target_forwards: int = 0  # all target forwards, prefill included
    draft_forwards: int = 0
    prefill_time_s: float = 0.0
    draft_time_s: float = 0.0  # draft model forwards + draft-side ops
    verify_time_s: float = 0.0  # target tree forwards
    overhead_time_s: float = 0.0  # everything else: ops, cache compaction, Python
    overhead_fraction: float = 0.0  # overhead_time_s / (wall_time_s - prefill_time_s)
    stopped_on_eos: bool = False

    def finish(self):
        self.tokens_per_s = self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0
        if self.cycles:
            self.tau = (self.accepted_tokens + self.cycles) / self.cycles
            self.mean_verified_per_cycle = self.verified_tokens / self.cycles
        decode = self.wall_time_s - self.prefill_time_s
        self.overhead_time_s = max(decode - self.draft_time_s - self.verify_time_s, 0.0)
        self.overhead_fraction = self.overhead_time_s / decode if decode > 0 else 0.0
        return self

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    token_ids: List[int]
    stats: GenerationStats
    text: Optional[str] = None


def _check_request(prompt_ids, max_new_tokens):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise GenerationConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64).reshape(-1)
    if ids.numel() == 0:
        raise GenerationConfigError("the prompt is empty: at least one token is needed")
    return ids


class _Clock:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def autoregressive_generate(target: CausalLM, prompt_ids, max_new_tokens: int,
                            sampling: Optional[SamplingParams] = None,
                            stop_token_ids: Iterable[int] = (),
                            on_tokens: Optional[Callable[[List[int]], None]] = None,
                            verifier=None) -> GenerationResult:
    """The target's own decoding, one token per forward (the AR baseline).

    ``verifier``: how the target runs (:func:`~heterospec.verifier.make_verifier`; default: the
    same kind :class:`SpeculativeGenerator` picks, so the baseline runs the same forward code).
    Greedy takes ``argmax``; sampling draws through ``fused_verify`` on a root-only tree, so the
    temperature / top-k / top-p processing is exactly the speculative path's."""
    sampling = sampling or SamplingParams()
    sampling.check()
    ids = _check_request(prompt_ids, max_new_tokens).to(target.device)
    check_context(target, ids.numel(), max_new_tokens)
    stop = set(int(t) for t in stop_token_ids)
    clock = _Clock(target.device)
    gen = sampling.generator()
    stats = GenerationStats(method="ar", prompt_tokens=ids.numel())
    verifier = verifier if verifier is not None else make_verifier(target)
    calls0 = target.forward_calls
    t0 = clock()
    verifier.reset()
    if ids.numel() > 1:
        verifier.prefill(ids[:-1])
    stats.prefill_time_s = clock() - t0
    root, out = ids[-1:], []
    parents = torch.tensor([[-1]], dtype=torch.int64, device=target.device)
    while len(out) < max_new_tokens:
        tv = clock()
        logits = verifier.prefill(root)
        stats.verify_time_s += clock() - tv
        if sampling.temperature == 0.0:
            tok = int(torch.argmax(logits[-1]))
        else:
            u = torch.rand((1, 1), generator=gen).to(target.device)
            res = hx.fused_verify(logits[None, -1:], root[None], parents,
                                  temperature=sampling.temperature, top_k=int(sampling.top_k),
                                  top_p=sampling.top_p, uniforms=u)
            tok = int(res.out_tokens[0, 0])
        out.append(tok)
        stats.cycles += 1
        stats.verified_tokens += 1
        if on_tokens:
            on_tokens([tok])
        if tok in stop:
            stats.stopped_on_eos = True
            break
        root = torch.tensor([tok], dtype=torch.int64, device=target.device)
    stats.wall_time_s = clock() - t0
    stats.new_tokens = len(out)
    stats.target_forwards = target.forward_calls - calls0
    return GenerationResult(out, stats.finish())


class SpeculativeGenerator:
    """Lossless tree speculative decoding of one request at a time (batch 1).

    ``generate`` runs cycles of: draft ``policy.levels`` levels; for HeteroSpec ``stratify`` the
    pool and draft the stratum's extra levels; ``build_tree`` keeps the stratum's top-N; one target
    forward over root + tree; ``fused_verify``; commit (the target's verifier and the drafter).
    Every per-token step goes through the public heterospec_ext ops."""

    def __init__(self, target: CausalLM, drafter: Drafter, policy: StaticTree, *,
                 verifier: str = "auto", static_cache: bool = False, cuda_graphs: bool = False,
                 max_len: int = 2048):
        """``verifier``: how the target runs (:mod:`heterospec.verifier`): ``auto`` (``lean``
        for Llama-family targets on the CPU, else ``dynamic``), ``lean``, ``dynamic``,
        ``static`` (a preallocated :class:`~heterospec.static_cache.StaticTreeCache` of
        ``max_len`` entries, fixed-shape forwards) or ``cuda-graphs`` (``static`` plus the tree
        forward captured once per tree size the policy can produce and replayed; CUDA only, the
        capture happens here). ``static_cache=True`` / ``cuda_graphs=True`` are shorthands for
        the last two. With a fixed ``max_len``, a request needs ``prompt + max_new_tokens +
        policy.n_max`` entries."""
        check_same_vocab(target, drafter)
        if drafter.top_k != policy.top_k:
            raise GenerationConfigError(
                f"drafter top_k={drafter.top_k} differs from the policy's top_k={policy.top_k}")
        if cuda_graphs:
            verifier = "cuda-graphs"
        elif static_cache:
            verifier = "static"
        from .cuda_graphs import tree_sizes

        self.target = target
        self.drafter = drafter
        self.policy = policy
        self.max_len = max_len
        self.verifier_kind = verifier
        self.verifier = make_verifier(target, verifier, max_len, tree_sizes(policy))
        # an observer called after every cycle with its tree, pool and acceptance
        self.on_cycle: Optional[Callable[[dict], None]] = None

    @property
    def cache(self):
        """The target's verifier (holds the committed KV cache)."""
        return self.verifier

    def generate(self, prompt_ids, max_new_tokens: int,
                 sampling: Optional[SamplingParams] = None,
                 stop_token_ids: Iterable[int] = (),
                 on_tokens: Optional[Callable[[List[int]], None]] = None) -> GenerationResult:
        sampling = sampling or SamplingParams()
        sampling.check()
        ids = _check_request(prompt_ids, max_new_tokens).to(self.target.device)
        check_context(self.target, ids.numel(), max_new_tokens, self.policy.n_max)
        stop = set(int(t) for t in stop_token_ids)
        target, drafter, policy, verifier = self.target, self.drafter, self.policy, self.verifier
        dev = target.device
        clock = _Clock(dev)
        gen = sampling.generator()
        stats = GenerationStats(method=policy.name, prompt_tokens=ids.numel())
        if policy.adaptive:
            stats.stratum_counts = [0] * policy.policy_t.shape[0]
            thresholds = policy.thresholds_t.to(dev)
            policy_t = policy.policy_t.to(dev)
        static_top_n = torch.tensor([policy.total_tokens], dtype=torch.int64, device=dev)
        temperature, top_k, top_p = hx.ops.fused_verify.sampling_params(
            torch.empty(1, 1, device=dev), float(sampling.temperature), int(sampling.top_k),
            float(sampling.top_p))
        if fixed_capacity(self.verifier_kind) and \
                ids.numel() + max_new_tokens + policy.n_max > self.max_len:
            raise GenerationConfigError(
                f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) + the "
                f"policy's largest tree ({policy.n_max}) exceed the static KV cache's "
                f"max_len={self.max_len}; build the generator with a larger max_len")
        calls0 = target.forward_calls
        t0 = clock()
        verifier.reset()
        target.captured_hidden = None
        if ids.numel() > 1:
            verifier.prefill(ids[:-1])
        # EAGLE-3 heads take the prompt's captured target states (rows of ids[:-1])
        drafter.reset(ids, target_hidden=target.captured_hidden)
        stats.prefill_time_s = clock() - t0
        root = int(ids[-1])
        out: List[int] = []
        committed = ids.tolist()  # every token the caches describe (past max_new_tokens too)
        while len(out) < max_new_tokens:
            td = clock()
            pool = drafter.draft(root, policy.levels)
            if policy.adaptive:
                strat = hx.stratify(pool.step_entropy, pool.confidence(), pool.parents,
                                    thresholds, policy_t)
                stratum, extra = int(strat.stratum[0]), int(strat.extra_depth[0])
                stats.stratum_counts[stratum] += 1
                if extra > 0:
                    pool = drafter.extend(extra)
                top_n = strat.top_n
            else:
                top_n = static_top_n
            stats.draft_time_s += clock() - td
            tree = hx.build_tree(pool.parents, pool.scores, pool.tokens, top_n, policy.n_max)
            n = int(tree.num_nodes[0])
            tokens, parents = tree.tokens[:, :n], tree.parents[:, :n]
            tv = clock()
            logits = verifier.tree_forward(tokens[0], tree.depth[0, :n], tree.mask[0, :n, :n])
            stats.verify_time_s += clock() - tv
            uniforms = torch.rand((1, n), generator=gen).to(dev)
            res = hx.fused_verify(logits[None], tokens, parents, temperature=temperature,
                                  top_k=top_k, top_p=top_p, uniforms=uniforms)
            a = int(res.num_accepted[0])
            nodes = res.accepted_nodes[0, :a + 1]
            new = res.out_tokens[0, :a + 1].tolist()
            verifier.compact(res.accepted_nodes[0], res.num_accepted[0])
            tc = clock()
            # the target states of the root and the accepted nodes precede each new token
            hidden = target.captured_hidden
            drafter.commit(tree.selected[0, nodes].tolist(), new,
                           target_hidden=None if hidden is None else hidden[nodes])
            stats.draft_time_s += clock() - tc
            stats.cycles += 1
            stats.verified_tokens += n
            stats.accepted_tokens += a
            committed.extend(new)
            if self.on_cycle:
                self.on_cycle({"nodes": n, "accepted": a, "tree": tree, "pool": pool,
                               "accepted_nodes": nodes.tolist(), "tokens": new,
                               "logits": logits,
                               "stratum": stratum if policy.adaptive else None})
            room = max_new_tokens - len(out)
            new = new[:room]
            for j, tok in enumerate(new):
                if tok in stop:
                    new = new[:j + 1]
                    stats.stopped_on_eos = True
                    break
            out.extend(new)
            if on_tokens:
                on_tokens(new)
            if stats.stopped_on_eos:
                break
            root = new[-1]
        stats.wall_time_s = clock() - t0
        stats.new_tokens = len(out)
        stats.target_forwards = target.forward_calls - calls0
        stats.draft_forwards = drafter.forward_calls
        # every token the target's cache describes, then the last root (for inspection)
        self.committed = committed
        return GenerationResult(out, stats.finish())
