"""Ranking metrics (docs/ranking.md): normalized entropy, exact AUC, GAUC — per task, over the whole eval set.

- NE = mean BCE(p̂, y) / H(p), p = base rate (mean label) of the eval set, H(p) = −p ln p − (1−p) ln(1−p)
  (natural logs; NE < 1 beats predicting the base rate; NaN when the eval set has a single class).
- AUC = P(score of a random positive > score of a random negative), ties count 1/2: rank-based
  (Mann–Whitney U with average ranks for ties), exact, O(N log N).
- GAUC = Σ_u n_u · AUC_u / Σ_u n_u over users with both classes, n_u = the user's impressions (users with a
  single class are skipped); NaN when no user has both classes.
All functions take numpy or torch 1-D arrays; logits are converted with a numerically stable BCE.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def bce_with_logits(logits, labels) -> np.ndarray:
    """Elementwise BCE in float64: max(z, 0) − z·y + ln(1 + e^−|z|)."""
    z, y = _np(logits).astype(np.float64), _np(labels).astype(np.float64)
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def entropy(p: float) -> float:
    """Binary entropy in nats (0 at p in {0, 1})."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return float(-p * np.log(p) - (1 - p) * np.log(1 - p))


def normalized_entropy(logits, labels) -> float:
    """mean BCE / H(base rate of labels); NaN if labels have one class (or are empty)."""
    y = _np(labels).astype(np.float64)
    if y.size == 0:
        return float("nan")
    h = entropy(float(y.mean()))
    return float(bce_with_logits(logits, y).mean() / h) if h > 0 else float("nan")


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of scores [N] in ascending order, tied scores sharing their average rank."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    new_group = np.ones(s.size, dtype=bool)
    new_group[1:] = sorted_s[1:] != sorted_s[:-1]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], s.size)  # exclusive
    avg = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size)
    ranks[order] = avg[group]
    return ranks


def auc(scores, labels) -> float:
    """Exact ROC AUC with ties counted 1/2 (NaN if a class is missing)."""
    s, y = _np(scores).astype(np.float64), _np(labels).astype(np.float64) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(scores, labels, groups) -> float:
    """Impression-weighted mean of per-group AUC over groups holding both classes (NaN if none)."""
    s, y, g = _np(scores).astype(np.float64), _np(labels).astype(np.float64) > 0.5, _np(groups)
    if s.size == 0:
        return float("nan")
    # ranks within each group: sort by (group, score), average ranks over (group, score) ties
    order = np.lexsort((s, g))
    gs, ss, ys = g[order], s[order], y[order]
    new_g = np.ones(s.size, dtype=bool)
    new_g[1:] = gs[1:] != gs[:-1]
    g_start = np.flatnonzero(new_g)
    g_id = np.cumsum(new_g) - 1
    new_tie = new_g.copy()
    new_tie[1:] |= ss[1:] != ss[:-1]
    t_start = np.flatnonzero(new_tie)
    t_end = np.append(t_start[1:], s.size)
    t_id = np.cumsum(new_tie) - 1
    rank = (t_start + 1 + t_end) / 2.0  # global 1-based average rank of each tie block
    local = rank[t_id] - g_start[g_id]  # rank inside the group
    n = np.bincount(g_id).astype(np.float64)
    n_pos = np.bincount(g_id, weights=ys.astype(np.float64))
    n_neg = n - n_pos
    pos_rank_sum = np.bincount(g_id, weights=local * ys)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per = (pos_rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float((per * n[ok]).sum() / n[ok].sum())


def ranking_metrics(logits: np.ndarray, labels: np.ndarray, users: np.ndarray, task_names: Sequence[str],
                    regression_pred=None, regression_target=None, regression_name: str = "") -> Dict[str, float]:
    """All eval metrics: logits / labels [N, K], users [N] ->
    {ne_<t>, auc_<t>, gauc_<t>, logloss_<t>, base_rate_<t>} per task, ne_mean / auc_mean / gauc_mean over tasks,
    num_impressions, num_users, and rmse_<regression_name> when a regression prediction is given."""
    z, y, u = _np(logits), _np(labels), _np(users)
    out: Dict[str, float] = {}
    for k, t in enumerate(task_names):
        out[f"ne_{t}"] = normalized_entropy(z[:, k], y[:, k])
        out[f"auc_{t}"] = auc(z[:, k], y[:, k])
        out[f"gauc_{t}"] = gauc(z[:, k], y[:, k], u)
        out[f"logloss_{t}"] = float(bce_with_logits(z[:, k], y[:, k]).mean()) if y.shape[0] else float("nan")
        out[f"base_rate_{t}"] = float(y[:, k].mean()) if y.shape[0] else float("nan")
    for m in ("ne", "auc", "gauc"):
        out[f"{m}_mean"] = float(np.mean([out[f"{m}_{t}"] for t in task_names])) if task_names else float("nan")
    if regression_pred is not None and regression_target is not None:
        diff = _np(regression_pred).astype(np.float64) - _np(regression_target).astype(np.float64)
        out[f"rmse_{regression_name}"] = float(np.sqrt(np.mean(diff ** 2))) if diff.size else float("nan")
    out["num_impressions"] = int(y.shape[0])
    out["num_users"] = int(np.unique(u).size)
    return out


def metric_names(task_names: Sequence[str], regression_name: str = "") -> list:
    """Names :func:`ranking_metrics` produces (for config checks and log lines)."""
    names = [f"{m}_{t}" for t in task_names for m in ("ne", "auc", "gauc", "logloss", "base_rate")]
    names += ["ne_mean", "auc_mean", "gauc_mean"]
    return names + ([f"rmse_{regression_name}"] if regression_name else [])


LOWER_IS_BETTER = ("ne_", "logloss_", "rmse_")


def higher_is_better(name: str) -> bool:
    return not name.startswith(LOWER_IS_BETTER)
