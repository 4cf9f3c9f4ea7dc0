"""NE / AUC / GAUC (trainer/ranking_metrics.py) against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from hstu.trainer.ranking_metrics import (auc, average_ranks, gauc, higher_is_better, metric_names,
                                          normalized_entropy, ranking_metrics)


def logit(p):
    return math.log(p / (1 - p))


def test_normalized_entropy_by_hand():
    p_hat = [0.8, 0.4, 0.6, 0.2]
    y = [1, 0, 1, 1]
    # BCE: -ln .8, -ln .6, -ln .6, -ln .2 = .22314, .51083, .51083, 1.60944 -> mean .71356
    # base rate .75: H = -.75 ln .75 - .25 ln .25 = .21576 + .34657 = .56233 -> NE = 1.26892
    ne = normalized_entropy([logit(p) for p in p_hat], y)
    assert ne == pytest.approx(0.713559 / 0.562335, rel=1e-5)
    assert ne == pytest.approx(1.268920, rel=1e-5)
    # predicting the base rate everywhere gives NE = 1 exactly; a single class is undefined
    assert normalized_entropy(np.full(4, logit(0.75)), y) == pytest.approx(1.0)
    assert math.isnan(normalized_entropy([0.3, -2.0], [1, 1]))
    # torch inputs, extreme logits stay finite
    assert math.isfinite(normalized_entropy(torch.tensor([80.0, -80.0]), torch.tensor([1.0, 0.0])))


def test_auc_by_hand_with_ties():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    labels = [0, 0, 1, 1, 1]
    # positive/negative pairs (6): .35>.1 1, .35<.4 0, .8 beats both 2, .4>.1 1, .4=.4 tie 1/2 -> 4.5 / 6
    assert auc(scores, labels) == pytest.approx(0.75)
    assert average_ranks(np.array(scores)).tolist() == [1.0, 3.5, 2.0, 5.0, 3.5]
    assert auc([1, 1, 1], [0, 1, 1]) == pytest.approx(0.5)  # all tied
    assert auc([3, 2, 1], [1, 0, 0]) == 1.0 and auc([1, 2, 3], [1, 0, 0]) == 0.0
    assert math.isnan(auc([1, 2], [1, 1]))


def test_auc_matches_brute_force_pairs():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 300).astype(float)  # many ties
    y = rng.random(300) < 0.3
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert auc(s, y) == pytest.approx(brute, abs=1e-12)


def test_gauc_by_hand():
    users = ["a", "a", "a", "b", "b", "c", "c", "c", "c"]
    scores = [0.9, 0.2, 0.5, 0.3, 0.7, 0.1, 0.4, 0.4, 0.8]
    labels = [1, 0, 0, 1, 1, 0, 1, 0, 1]
    # a: pos .9 vs negs .2, .5 -> AUC 1 (3 impressions); b: single class, skipped;
    # c: pos .4 vs negs .1 (1), .4 (1/2); pos .8 vs both (2) -> 3.5 / 4 = .875 (4 impressions)
    # GAUC = (3 * 1 + 4 * .875) / 7 = 6.5 / 7
    u = np.array([{"a": 1, "b": 2, "c": 3}[x] for x in users])
    assert gauc(scores, labels, u) == pytest.approx(6.5 / 7)
    assert math.isnan(gauc([0.1, 0.2], [1, 1], [1, 2]))
    # user order / interleaving does not matter
    perm = np.random.default_rng(1).permutation(9)
    assert gauc(np.array(scores)[perm], np.array(labels)[perm], u[perm]) == pytest.approx(6.5 / 7)


def test_ranking_metrics_names_and_direction():
    z = np.array([[2.0, -1.0], [-1.0, 0.5], [0.3, 0.2], [1.0, -2.0]])
    y = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=np.float32)
    m = ranking_metrics(z, y, np.array([1, 1, 2, 2]), ("like", "love"), np.array([4.0, 2.0, 3.0, 5.0]),
                        np.array([5.0, 1.0, 3.0, 3.0]), "rating")
    assert set(metric_names(("like", "love"), "rating")) <= set(m)
    assert m["auc_like"] == pytest.approx(auc(z[:, 0], y[:, 0]))
    assert m["ne_mean"] == pytest.approx((m["ne_like"] + m["ne_love"]) / 2)
    assert m["rmse_rating"] == pytest.approx(math.sqrt((1 + 1 + 0 + 4) / 4))
    assert m["base_rate_like"] == 0.5 and m["num_impressions"] == 4 and m["num_users"] == 2
    assert not higher_is_better("ne_mean") and higher_is_better("auc_like") and not higher_is_better("rmse_rating")
