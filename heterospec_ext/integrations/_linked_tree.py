"""SGLang's first-child / next-sibling trees in fused_verify's parent convention.

SGLang describes a request's draft tree by two link arrays over its ``n`` node slots (node 0 is the
root): ``retrive_next_token[v]`` is v's first child and ``retrive_next_sibling[v]`` the next child
of v's parent (-1: none). Its kernels walk these links from the root, so nodes may be numbered in
any order. ``fused_verify`` needs every parent to precede its child and tries children in
increasing index, so the adapter renumbers nodes. Every quantity below is computed with batched
tensor ops (pointer jumping: ``ceil(log2 n) + 1`` rounds of gathers), never with host reads.

The renumbering sorts nodes by ``(largest engine index on the link path from the root, number of
links on that path)``: a node's key is never smaller than that of the node whose link reaches it,
and is strictly larger in the second component when the first ties, so parents come before
children and earlier siblings before later ones. When every link points to a larger index (what
``build_tree_kernel_efficient`` and ``reconstruct_indices_from_tree_mask`` produce) the
renumbering is the identity.
"""
from typing import List, NamedTuple

import torch


class LinkedTree(NamedTuple):
    """A batch of engine trees, read. Shapes ``[bs, n]`` unless noted; "engine" means SGLang's
    node slots, "ours" the renumbered order fused_verify walks."""

    order: torch.Tensor  # int64: order[b, j] = engine node at our index j (root at 0)
    parents: torch.Tensor  # int64 over our indices; -1 for the root and for nodes outside the tree
    predecessor: torch.Tensor  # int64 engine node whose link reaches engine node v (-1: none)
    in_tree: torch.Tensor  # bool over engine nodes: reached from the root within the depth cap
    well_formed: torch.Tensor  # [bs] bool: links in range, each node reached once, no cycle


def read_linked_tree(next_token: torch.Tensor, next_sibling: torch.Tensor,
                     max_depth: int) -> LinkedTree:
    """Read ``[bs, n]`` int64 link arrays (values ``-1`` or engine node slots).

    The root's own ``next_sibling`` is ignored, as SGLang's walk never follows it. Nodes deeper
    than ``max_depth`` (SGLang's ``num_speculative_tokens - 1``) are outside the tree, as are slots
    no link chain from the root reaches (SGLang leaves those when it drops an orphaned draft token).
    A request is malformed when a link leaves ``[-1, n)``, a node is reached by two links, a link
    reaches the root, or links form a cycle; its ``well_formed`` entry is False and its other
    fields are unspecified.
    """
    bs, n = next_token.shape
    dev = next_token.device
    nodes = torch.arange(n, device=dev).expand(bs, n).contiguous()
    next_sibling = next_sibling.clone()
    next_sibling[:, :1] = -1
    in_range = (((next_token >= -1) & (next_token < n)).all(1)
                & ((next_sibling >= -1) & (next_sibling < n)).all(1))
    # Column n collects "no link" so that scatters need no data-dependent masking.
    child_link = torch.where((next_token >= 0) & (next_token < n), next_token, n)
    sibling_link = torch.where((next_sibling >= 0) & (next_sibling < n), next_sibling, n)
    ones = torch.ones_like(child_link)
    incoming = torch.zeros(bs, n + 1, dtype=torch.int64, device=dev)
    incoming.scatter_add_(1, child_link, ones).scatter_add_(1, sibling_link, ones)
    incoming = incoming[:, :n]
    well_formed = in_range & (incoming <= 1).all(1) & (incoming[:, 0] == 0)

    predecessor = torch.full((bs, n + 1), -1, dtype=torch.int64, device=dev)
    predecessor.scatter_(1, child_link, nodes).scatter_(1, sibling_link, nodes)
    predecessor = predecessor[:, :n]
    by_child_link = torch.zeros(bs, n + 1, dtype=torch.bool, device=dev)
    by_child_link.scatter_(1, child_link, True)
    by_child_link = by_child_link[:, :n]
    linked = predecessor >= 0

    # Pointer jumping along predecessors (Wyllie's list ranking): after round r, `up` is the
    # 2^r-th predecessor (or the chain's first node), and the sums/maxima cover the path to it.
    up = torch.where(linked, predecessor, nodes)
    depth = (linked & by_child_link).to(torch.int64)  # child links on the path = tree depth
    path_links = linked.to(torch.int64)
    path_max = nodes.clone()
    first_sibling = torch.where(linked & ~by_child_link, predecessor, nodes)
    for _ in range(max(1, (n - 1).bit_length()) + 1):
        depth = depth + depth.gather(1, up)
        path_links = path_links + path_links.gather(1, up)
        path_max = torch.maximum(path_max, path_max.gather(1, up))
        up = up.gather(1, up)
        first_sibling = first_sibling.gather(1, first_sibling)
    chain_ends = predecessor.gather(1, up) < 0  # False only on a cycle
    well_formed = well_formed & chain_ends.all(1)
    in_tree = chain_ends & (up == 0) & (depth <= max_depth)

    key = torch.where(in_tree, path_max * (n + 1) + path_links, nodes * (n + 1))
    order = torch.argsort(key, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, nodes)
    parent = predecessor.gather(1, first_sibling)
    parents = torch.where(in_tree & (nodes > 0), rank.gather(1, parent.clamp_min(0)), -1)
    return LinkedTree(order, parents.gather(1, order), predecessor, in_tree, well_formed)


def _find_cycle(edges):
    """A cycle of the directed graph ``{node: [(array name, target), ...]}`` as a list of
    ``(node, array name of the link leaving it)``, or None."""
    state, stack_path = {}, []

    def visit(v):
        state[v] = "open"
        for name, target in edges.get(v, []):
            stack_path.append((v, name))
            if state.get(target) == "open":
                start = next(i for i, (u, _) in enumerate(stack_path) if u == target)
                return stack_path[start:]
            if target not in state:
                found = visit(target)
                if found:
                    return found
            stack_path.pop()
        state[v] = "done"
        return None

    for v in list(edges):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def describe_defect(next_token: List[int], next_sibling: List[int], b: int) -> str:
    """Human-readable reason one request's links (python lists) are malformed."""
    n = len(next_token)
    links = [("retrive_next_token", v, t) for v, t in enumerate(next_token)]
    links += [("retrive_next_sibling", v, s) for v, s in enumerate(next_sibling) if v > 0]
    for name, v, target in links:
        if not -1 <= target < n:
            return f"{name}: request {b}: node {v} links to {target}, outside [-1, {n})"
    edges = {}
    for name, v, target in links:
        if target >= 0:
            edges.setdefault(v, []).append((name, target))
    cycle = _find_cycle(edges)
    if cycle:
        arrays = " / ".join(sorted({name for _, name in cycle}))
        nodes = [v for v, _ in cycle] + [cycle[0][0]]
        return (f"{arrays}: request {b}: the links form a cycle through nodes "
                f"{' -> '.join(str(v) for v in nodes)}")
    reached_from = {}
    for name, v, target in links:
        if target == 0:
            return (f"{name}: request {b}: node {v} links to the root (node 0); the root has no "
                    f"parent and no previous sibling")
        if target >= 0:
            if target in reached_from:
                first = reached_from[target]
                return (f"retrive_next_token / retrive_next_sibling: request {b}: node {target} "
                        f"is reached twice ({first[0]}[{first[1]}] and {name}[{v}]); the links "
                        f"must form a tree")
            reached_from[target] = (name, v)
    return f"retrive_next_token / retrive_next_sibling: request {b}: malformed links"
