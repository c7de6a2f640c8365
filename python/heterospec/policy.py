"""Tree policies: the static EAGLE tree and HeteroSpec's entropy-stratified tree.

A policy JSON (written by ``heterospec calibrate``, read by :func:`load_policy`)::

    {
      "format": "heterospec-policy", "version": 1,
      "thresholds": [7 floats, ascending],   # CART cut points on H(P*), nats
      "entropy_topk": 10, "log_base": "e", "pstar": "last_prob",
      "depth": 5, "top_k": 10, "total_tokens": 60,   # the static tree it was fitted on
      "alpha": null, "gammas": [0.3, 0.6, 1.0],      # null alpha = ceil(depth / 2)
      "target": "...", "draft": "...", "calibration": {...}   # provenance, free-form
    }
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

import heterospec_ext as hx

from .errors import GenerationConfigError, PolicyFileError

POLICY_FORMAT = "heterospec-policy"
POLICY_VERSION = 1
# CART cut points in a policy file: a depth-3 regression tree has 7 splits (8 strata)
POLICY_THRESHOLDS = 7
POLICY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies")
DEFAULT_POLICY_FILE = os.path.join(POLICY_DIR, "smollm2-135m-int8.json")
# fitted for SmolLM2-135M-Instruct with the shipped trained EAGLE-3 head (heads/)
EAGLE3_POLICY_FILE = os.path.join(POLICY_DIR, "smollm2-135m-eagle3.json")
# the same strata with each stratum's (extra depth, top-N) chosen for this CPU's measured costs
# (`heterospec calibrate --cost-aware-out`); `heterospec bench --cost-policy` runs it as 'cost'
EAGLE3_COST_POLICY_FILE = os.path.join(POLICY_DIR, "smollm2-135m-eagle3-cost.json")


def _check_tree(depth: int, top_k: int, total_tokens: int):
    if depth < 1 or top_k < 1 or total_tokens < 2:
        raise GenerationConfigError(
            f"tree needs depth >= 1, top_k >= 1 and total_tokens >= 2; got depth={depth}, "
            f"top_k={top_k}, total_tokens={total_tokens}")
    if top_k > 64:
        raise GenerationConfigError(f"top_k must be <= 64 (draft_topk_entropy limit), got {top_k}")


@dataclass
class StaticTree:
    """EAGLE's fixed tree: ``depth + 1`` draft levels of ``top_k``-wide expansion, verify the best
    ``total_tokens - 1`` nodes plus the root. Defaults are EAGLE's eval-script defaults."""

    depth: int = 5
    top_k: int = 10
    total_tokens: int = 60
    name: str = "static"

    def __post_init__(self):
        _check_tree(self.depth, self.top_k, self.total_tokens)

    @property
    def levels(self) -> int:
        return self.depth + 1

    @property
    def adaptive(self) -> bool:
        return False

    @property
    def n_max(self) -> int:
        return self.total_tokens

    def describe(self) -> dict:
        return {"name": self.name, "depth": self.depth, "top_k": self.top_k,
                "total_tokens": self.total_tokens}


@dataclass
class HeteroSpec(StaticTree):
    """HeteroSpec: ``stratify`` the depth-``depth`` pool by H(P*); the low-entropy strata draft
    ``alpha - i`` more levels and verify ``gamma_i * (total_tokens - 1) + alpha - i`` nodes
    (``make_policy``); the other strata keep the static tree."""

    thresholds: Sequence[float] = (0.3, 0.6, 1.0, 1.5, 2.2, 3.0, 4.0)
    alpha: Optional[int] = None
    gammas: Sequence[float] = (0.3, 0.6, 1.0)
    entropy_topk: Optional[int] = None
    name: str = "heterospec"
    source: Optional[str] = None
    # False: the ablation "+extended depth" (DED) alone; every stratum verifies total_tokens
    prune_top_n: bool = True
    # an explicit per-stratum table [[extra_depth, top_n incl. root], ...] (the cost-aware rule
    # of ``heterospec calibrate --cost-aware-out``) instead of the paper's alpha/gamma rule
    table: Optional[Sequence[Sequence[int]]] = None
    rule: str = "paper"

    def __post_init__(self):
        super().__post_init__()
        thr = [float(t) for t in self.thresholds]
        if len(thr) < len(self.gammas) - 1 or any(not math.isfinite(t) for t in thr) or \
                any(b < a for a, b in zip(thr, thr[1:])):
            raise GenerationConfigError(
                f"thresholds must be >= {len(self.gammas) - 1} finite ascending numbers, got {thr}")
        if self.entropy_topk is not None and self.entropy_topk != self.top_k:
            raise GenerationConfigError(
                f"the policy's thresholds were fitted with entropy top-K {self.entropy_topk} but "
                f"the drafter expands top_k={self.top_k}; use top_k={self.entropy_topk}")
        self.thresholds = thr
        self.thresholds_t = torch.tensor(thr, dtype=torch.float32)
        if self.table is not None:
            rows = [[int(e), int(n)] for e, n in self.table]
            if len(rows) != len(thr) + 1 or any(e < 0 or n < 2 for e, n in rows):
                raise GenerationConfigError(
                    f"a policy table needs {len(thr) + 1} rows [extra_depth >= 0, top_n >= 2] "
                    f"(one per stratum), got {self.table}")
            self.table = rows
            self.rule = "cost-aware" if self.rule == "paper" else self.rule
            self.policy_t = torch.tensor(rows, dtype=torch.int64)
        else:
            self.policy_t = hx.make_policy(self.depth, self.total_tokens - 1, alpha=self.alpha,
                                           gammas=tuple(self.gammas), num_strata=len(thr) + 1)
        if not self.prune_top_n:
            self.policy_t[:, 1] = self.total_tokens

    @property
    def adaptive(self) -> bool:
        return True

    @property
    def n_max(self) -> int:
        return int(self.policy_t[:, 1].max())

    @property
    def max_extra_depth(self) -> int:
        return int(self.policy_t[:, 0].max())

    def shapes(self):
        """The distinct (draft levels, verified nodes incl. root) shapes the policy can produce."""
        return sorted({(self.levels + int(e), int(n)) for e, n in self.policy_t.tolist()})

    def describe(self) -> dict:
        d = super().describe()
        d.update({"thresholds": self.thresholds, "alpha": self.alpha, "gammas": list(self.gammas),
                  "policy": self.policy_t.tolist(), "rule": self.rule, "source": self.source,
                  "prune_top_n": self.prune_top_n})
        return d

    def to_json(self, **provenance) -> dict:
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION,
                "thresholds": list(self.thresholds), "entropy_topk": self.top_k,
                "log_base": "e", "pstar": "last_prob", "depth": self.depth, "top_k": self.top_k,
                "total_tokens": self.total_tokens, "alpha": self.alpha,
                "gammas": list(self.gammas), "rule": self.rule,
                **({"policy_table": self.table} if self.table is not None else {}),
                **provenance}


def load_policy(path: str, **overrides) -> HeteroSpec:
    """Read a policy JSON; ``overrides`` (depth, top_k, total_tokens, alpha, gammas) replace the
    file's tree settings. Raises :class:`PolicyFileError` naming the file and the problem, and
    :class:`GenerationConfigError` when the file is fine but an override does not fit it."""
    if not os.path.isfile(path):
        raise PolicyFileError(f"policy file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyFileError(f"policy file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
        raise PolicyFileError(f"{path} is not a heterospec policy (needs \"format\": "
                              f"\"{POLICY_FORMAT}\")")
    if data.get("version") != POLICY_VERSION:
        raise PolicyFileError(f"{path}: unsupported policy version {data.get('version')!r} "
                              f"(this driver reads version {POLICY_VERSION})")
    thr = data.get("thresholds")
    if not isinstance(thr, list) or len(thr) != POLICY_THRESHOLDS or \
            not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in thr):
        raise PolicyFileError(f"{path}: \"thresholds\" must be a list of {POLICY_THRESHOLDS} "
                              f"numbers, got {thr!r}")
    if data.get("log_base", "e") != "e" or data.get("pstar", "last_prob") != "last_prob":
        raise PolicyFileError(f"{path}: only log_base \"e\" and pstar \"last_prob\" are supported")
    cfg = {key: data[key] for key in ("depth", "top_k", "total_tokens", "alpha", "gammas")
           if key in data and data[key] is not None}
    entropy_topk = data.get("entropy_topk")
    table = data.get("policy_table")
    if table is not None:
        if any(k in overrides and overrides[k] is not None for k in ("depth", "total_tokens")):
            raise PolicyFileError(f"{path} has an explicit policy_table (cost-aware rule): its "
                                  "tree cannot be overridden with --depth/--total-tokens")
        cfg["table"] = table
        cfg["rule"] = str(data.get("rule", "cost-aware"))
    try:  # the file on its own: its errors are the file's
        policy = HeteroSpec(thresholds=thr, entropy_topk=entropy_topk, source=path, **cfg)
    except (GenerationConfigError, TypeError, ValueError) as exc:
        raise PolicyFileError(f"{path}: {exc}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return policy
    # the caller's overrides: their errors stay GenerationConfigError (the caller's to fix)
    return HeteroSpec(thresholds=thr, entropy_topk=entropy_topk, source=path,
                      **{**cfg, **overrides})


def save_policy(policy: HeteroSpec, path: str, **provenance) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(policy.to_json(**provenance), fh, indent=2)
        fh.write("\n")


def resolve_policy(spec: str, default_file: str = DEFAULT_POLICY_FILE, **tree) -> StaticTree:
    """``static`` (EAGLE defaults unless overridden), ``heterospec`` (``default_file``: the
    shipped policy of the draft) or a path to a policy JSON."""
    tree = {k: v for k, v in tree.items() if v is not None}
    if spec == "static":
        return StaticTree(**tree)
    if spec == "heterospec":
        return load_policy(default_file, **tree)
    return load_policy(spec, **tree)
