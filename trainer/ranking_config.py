"""Config sections of the generative-ranking task (``task: ranking``; docs/ranking.md).

Kept apart from trainer/config.py (which holds the retrieval sections) so that file stays small; RunConfig
embeds :class:`RankingConfig` as its ``ranking`` section, so keys are set as ``ranking.<field>`` in YAML and on
the command line like any other section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class SyntheticRankingConfig:
    """Streaming synthetic ranking generator (trainer/data/synthetic_ranking.py); used when data.name=synthetic."""

    num_users: int = 2000
    num_items: int = 2000
    num_clusters: int = 20  # latent interest clusters (items are split evenly among them)
    creators_per_cluster: int = 8  # each item has one creator; creators publish inside one cluster
    num_countries: int = 8  # contextual feature; a country skews cluster preferences
    min_seq_len: int = 20  # impressions per user, uniform in [min_seq_len, max_seq_len]
    max_seq_len: int = 100
    zipf_exponent: float = 1.0  # item popularity inside a cluster ~ rank^-s
    follow_prob: float = 0.03  # per-event probability of following one more creator
    interest_switch: float = 0.1  # per-event probability that the current interest cluster is re-drawn
    move_prob: float = 0.005  # per-event probability of moving to another region (an uninformative slow series)
    seed: int = 1234
    # streaming training (trainer/data/ranking_stream.py; docs/ranking.md "Streaming synthetic data"): each train
    # batch generates only its users, nothing is materialised but the first eval_users users (evaluation and the
    # item-rate baseline); stream=true needs 1 <= eval_users <= num_users, eval_users > 0 needs stream=true
    stream: bool = False
    eval_users: int = 0
    prefetch_batches: int = 0  # stream: train batches generated ahead by a background thread (0 = inline)


@dataclass
class RankingConfig:
    """Generative ranking: tasks, split, features, heads (docs/ranking.md)."""

    tasks: List[str] = field(default_factory=list)  # binary tasks; [] = all the dataset defines
    task_weights: List[float] = field(default_factory=list)  # loss weight per task; [] = 1.0 each
    regression_weight: float = 0.0  # > 0: also regress the dataset's regression target (ml-1m: rating), MSE
    num_eval_targets: int = 10  # per user, the last K events are the eval candidates (chronological split)
    contextual: Optional[List[str]] = None  # contextual (prefix) features to use; None = all the dataset has
    side_series: Optional[List[str]] = None  # slowly changing series to merge in; None = all the dataset has
    zip_prefix_len: int = 2  # ml-1m: zip-code prefix length used as the zip contextual token
    max_side_tokens: int = 32  # side tokens kept per example (the oldest dropped)
    action_with_item: bool = True  # action token a_i = emb_action(a_i) + emb_item(x_i) (else the action alone)
    head_hidden_dim: int = 64  # task heads: D -> hidden -> (num tasks [+1 regression])
    dlrm_mlp: List[int] = field(default_factory=lambda: [256, 128])  # DLRM top MLP widths (model.arch=dlrm)
    synthetic: SyntheticRankingConfig = field(default_factory=SyntheticRankingConfig)
