"""JaggedBatch layout, KJT conversion, loader determinism and exact resume (in-process and 1 worker)."""

import dataclasses

import numpy as np
import pytest
import torch

from hstu.trainer.config import DataConfig, SyntheticConfig
from hstu.trainer.data import build_loaders
from hstu.trainer.data.batch import JaggedBatch, batch_from_sequences
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.loader import SequenceLoader
from hstu.trainer.data.sequences import build_user_sequences, leave_one_out
from hstu.trainer.data.synthetic import generate


def _seqs():
    # user 1: [5, 6, 7], user 2: [8, 9], user 3: [1, 2, 3, 4]
    u = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3])
    i = np.array([5, 6, 7, 8, 9, 1, 2, 3, 4])
    t = np.arange(9) * 10
    return build_user_sequences(u, i, t, np.full(9, 4), max_seq_len=10, min_seq_len=1)


def test_batch_layout_offsets_and_labels():
    s = _seqs()
    b = batch_from_sequences(s, np.array([2, 0]), target_ids=np.array([70, 71, 72]),
                             target_timestamps=np.array([700, 710, 720]))
    assert b.item_ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert b.offsets.tolist() == [0, 4, 7] and b.lengths.tolist() == [4, 3] and b.max_len == 4
    assert b.user_ids.tolist() == [3, 1] and b.timestamps.tolist() == [50, 60, 70, 80, 0, 10, 20]
    assert b.target_ids.tolist() == [72, 70] and b.target_timestamps.tolist() == [720, 700]
    assert b.ratings.dtype == torch.int8 and b.item_ids.dtype == torch.int64 and b.offsets.dtype == torch.int64
    from hstu.modules.losses import next_item_labels  # the one definition of train labels

    assert next_item_labels(b.item_ids, b.offsets)[0].tolist() == [2, 3, 4, 0, 6, 7, 0]
    assert b.batch_size == 2 and b.num_events == 7


def test_to_device_and_kjt():
    b = batch_from_sequences(_seqs(), np.array([0, 1, 2]))
    moved = b.to("cpu")
    assert moved is not b and torch.equal(moved.item_ids, b.item_ids) and moved.max_len == 4
    kjt = b.to_kjt()
    assert kjt.keys() == ["item_id"]
    jt = kjt["item_id"]
    assert jt.values().tolist() == [5, 6, 7, 8, 9, 1, 2, 3, 4] and jt.lengths().tolist() == [3, 2, 4]
    assert kjt.offsets().tolist() == b.offsets.tolist()


def _signature(batches):
    return [(b.user_ids.tolist(), b.item_ids.tolist(), b.offsets.tolist()) for b in batches]


@pytest.fixture(scope="module")
def train_view():
    syn = SyntheticConfig(num_users=50, num_items=100, num_interests=5, min_seq_len=3, max_seq_len=12)
    return leave_one_out(generate(syn), max_seq_len=10)[0]


def test_loader_determinism_and_epoch_coverage(train_view):
    a = SequenceLoader(train_view, 8, shuffle=True, seed=3)
    b = SequenceLoader(train_view, 8, shuffle=True, seed=3)
    e0a, e0b = list(a), list(b)
    assert _signature(e0a) == _signature(e0b) and len(e0a) == len(a) == 7
    users = np.concatenate([x.user_ids.numpy() for x in e0a])
    assert sorted(users.tolist()) == train_view.user_ids.tolist()  # every user exactly once per epoch
    assert a.epoch == 1 and _signature(list(a)) != _signature(e0a)  # epoch 1 reshuffles
    assert _signature(list(SequenceLoader(train_view, 8, shuffle=True, seed=4))) != _signature(e0a)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_exact_resume_from_saved_position(train_view, num_workers):
    ref_loader = SequenceLoader(train_view, 8, shuffle=True, seed=3)
    reference = list(ref_loader) + list(ref_loader)  # epochs 0 and 1

    run = SequenceLoader(train_view, 8, shuffle=True, seed=3, num_workers=num_workers)
    it = iter(run)
    head = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == 3
    del it

    resumed = SequenceLoader(train_view, 8, shuffle=True, seed=3, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)  # rest of epoch 0, then epoch 1
    assert _signature(head + rest) == _signature(reference)
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batches_consumed"] == 0
    # the original loader, iterated again, also continues where it stopped
    assert _signature(list(run)) == _signature(reference[3:7])


def test_state_at_epoch_end_and_mismatch(train_view):
    loader = SequenceLoader(train_view, 8, shuffle=True, seed=3)
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_consumed"] == 0
    other = SequenceLoader(train_view, 16, shuffle=True, seed=3)
    with pytest.raises(DataError, match="batch_size"):
        other.load_state_dict(loader.state_dict())


def test_sequence_and_ranking_loaders_share_one_resumable_plan(train_view):
    """Both loaders plan through ResumableBatchPlan: the same users and seed give the same batches (the seeded
    permutation cut into batch_size pieces, an independent reference) and the same position bookkeeping."""
    from hstu.trainer.data.ranking_batch import RankingLoader

    seq = SequenceLoader(train_view, 8, shuffle=True, seed=3)
    none = np.zeros(seq.rows.size, dtype=np.int64)
    rank = RankingLoader(None, seq.rows, none, none, none, 8, predict="history", shuffle=True, seed=3)
    for epoch in (0, 2):
        order = seq.rows[np.random.default_rng(3 + epoch).permutation(seq.rows.size)]
        expected = [order[i : i + 8].tolist() for i in range(0, order.size, 8)]
        assert [b.tolist() for b in seq.plan(epoch)] == expected
        assert [seq.rows[b].tolist() for b in rank.plan(epoch)] == expected
    for loader in (seq, rank):
        loader.load_state_dict({"epoch": 1, "batches_consumed": len(loader)})  # a finished epoch 1 ...
        assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batches_consumed"] == 0  # ... is 2
        loader.set_epoch(2)
        loader.load_state_dict({"epoch": 2, "batches_consumed": 3})
        loader.set_epoch(2)  # already inside epoch 2: keeps the position
        assert loader.state_dict()["batches_consumed"] == 3
        with pytest.raises(DataError, match="seed=4"):
            loader.load_state_dict({"epoch": 0, "batches_consumed": 0, "seed": 4})


def test_build_loaders_train_and_eval(tmp_path):
    syn = SyntheticConfig(num_users=20, num_items=40, num_interests=4, min_seq_len=3, max_seq_len=10)
    seqs = generate(syn)
    cfg = DataConfig(name="synthetic", cache_dir=str(tmp_path), max_seq_len=5, batch_size=6, eval_batch_size=8)
    train, validation, evaluation = build_loaders(cfg, seqs)
    batches = list(train)
    assert all(b.target_ids is None and b.max_len <= 5 for b in batches)
    for b in batches:  # every train sequence ends right before the user's validation (second-to-last) event
        for k, uid in enumerate(b.user_ids.tolist()):
            row = b.item_ids[b.offsets[k]:b.offsets[k + 1]].tolist()
            assert row == seqs.user(uid - 1)[:-2][-len(row):].tolist()
    valid = list(validation)
    assert [b.batch_size for b in valid] == [8, 8, 4]
    for k in range(8):  # validation history + target = the user's events up to the second-to-last one
        lo, hi = valid[0].offsets[k].item(), valid[0].offsets[k + 1].item()
        assert valid[0].item_ids[lo:hi].tolist() + [valid[0].target_ids[k].item()] == \
            seqs.user(k)[:-1][-(hi - lo + 1):].tolist()
    evals = list(evaluation)
    assert [b.batch_size for b in evals] == [8, 8, 4]
    first = evals[0]
    assert first.user_ids.tolist() == list(range(1, 9))  # eval keeps user order
    for k in range(first.batch_size):  # history + target = the user's last (<= 6) events
        lo, hi = first.offsets[k].item(), first.offsets[k + 1].item()
        full = seqs.user(k)
        assert first.item_ids[lo:hi].tolist() + [first.target_ids[k].item()] == full[-(hi - lo + 1):].tolist()
    assert list(evaluation)[0].user_ids.tolist() == first.user_ids.tolist()  # eval always restarts
