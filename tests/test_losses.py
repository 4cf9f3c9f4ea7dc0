"""Sampled softmax loss and next-item labels (modules/losses.py)."""

import math

import torch
import pytest
import torch.nn.functional as F

import hstu.modules.losses as losses
from hstu.modules.losses import next_item_labels, sample_negatives, sampled_softmax_loss


def _table():
    # 5 items (+ padding row 0) in 2-D: easy numbers for hand computation
    return torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.6, 0.8]])


def test_next_item_labels_jagged():
    item_ids = torch.tensor([5, 6, 7, 8, 9, 10])
    offsets = torch.tensor([0, 3, 3, 4, 6])  # lengths 3, 0, 1, 2
    labels, valid = next_item_labels(item_ids, offsets)
    assert labels.tolist() == [6, 7, 0, 0, 10, 0]
    assert valid.tolist() == [True, True, False, False, True, False]


def test_hand_computed_value_with_generator():
    table = _table()
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([1, 5])
    valid = torch.tensor([True, True])
    temp = 0.5
    # the negatives the loss will draw: same generator state -> same draw
    neg = sample_negatives(2, 3, 5, torch.Generator().manual_seed(7))
    got = sampled_softmax_loss(q, pos, valid, lambda ids: table[ids], 5, 3, temp, torch.Generator().manual_seed(7))
    expected = 0.0
    for i in range(2):
        p = float(q[i] @ table[pos[i]])
        ns = [float(q[i] @ table[n]) for n in neg[i].tolist() if n != int(pos[i])]
        logits = [p / temp] + [s / temp for s in ns]
        expected += -(p / temp) + math.log(sum(math.exp(x) for x in logits))
    assert abs(float(got) - expected / 2) < 1e-5


def test_explicit_negatives_exact_value():
    table = _table()
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([1])  # score 1
    neg = torch.tensor([[2, 3]])  # scores 0, -1
    loss = sampled_softmax_loss(q, pos, torch.tensor([True]), lambda ids: table[ids], 5, 2, 1.0, negatives=neg)
    expected = -1.0 + math.log(math.e + 1.0 + math.exp(-1.0))
    assert abs(float(loss) - expected) < 1e-6


def test_collision_with_positive_contributes_nothing():
    table = _table()
    q = torch.tensor([[0.6, 0.8]])
    pos = torch.tensor([5])
    fn = lambda ids: table[ids]  # noqa: E731
    one = torch.tensor([True])
    with_collision = sampled_softmax_loss(q, pos, one, fn, 5, 3, 0.1, negatives=torch.tensor([[2, 5, 5]]))
    only_other = sampled_softmax_loss(q, pos, torch.tensor([True]), fn, 5, 1, 0.1, negatives=torch.tensor([[2]]))
    assert torch.allclose(with_collision, only_other, atol=1e-6)
    # and all-colliding negatives give loss 0 (softmax over the positive only)
    all_coll = sampled_softmax_loss(q, pos, torch.tensor([True]), fn, 5, 2, 0.1, negatives=torch.tensor([[5, 5]]))
    assert abs(float(all_coll)) < 1e-6


def test_invalid_positions_are_ignored():
    table = _table()
    q = torch.tensor([[1.0, 0.0], [123.0, -7.0], [0.0, 1.0]])
    pos = torch.tensor([1, 0, 2])
    valid = torch.tensor([True, False, True])
    neg = torch.tensor([[3, 4], [2, 4]])
    fn = lambda ids: table[ids]  # noqa: E731
    full = sampled_softmax_loss(q, pos, valid, fn, 5, 2, 0.2, negatives=neg)
    sub = sampled_softmax_loss(q[[0, 2]], pos[[0, 2]], torch.tensor([True, True]), fn, 5, 2, 0.2, negatives=neg)
    assert torch.allclose(full, sub)
    q.requires_grad_(True)
    sampled_softmax_loss(q, pos, valid, fn, 5, 2, 0.2, negatives=neg).backward()
    assert torch.all(q.grad[1] == 0)  # masked position gets no gradient
    none_valid = sampled_softmax_loss(q, pos, torch.zeros(3, dtype=torch.bool), fn, 5, 2, 0.2)
    assert float(none_valid.detach()) == 0.0 and none_valid.requires_grad


def test_gather_and_full_matmul_paths_agree(monkeypatch):
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(41, 4), dim=-1)
    q0 = F.normalize(torch.randn(6, 4), dim=-1)
    pos = torch.randint(1, 41, (6,))
    valid = torch.ones(6, dtype=torch.bool)
    neg = torch.randint(1, 41, (6, 3))
    neg[0, 1] = pos[0]  # one collision too
    pad = lambda x: F.pad(x, (0, 16))  # noqa: E731  zero-padding to D=20 keeps every dot product

    def run(q_in, table):
        q = q_in.clone().requires_grad_(True)
        loss = sampled_softmax_loss(q, pos, valid, lambda ids: table[ids], 40, 3, 0.05, negatives=neg)
        loss.backward()
        return loss.detach(), q.grad[:, :4]

    a, ga = run(q0, emb)  # R*D = 12 < 41 items: unique + gather route
    b, gb = run(pad(q0), pad(emb))  # R*D = 60 >= 41: all-items matmul route
    monkeypatch.setattr(losses, "MATMUL_CHUNK_ELEMENTS", 2 * 41)  # 2 rows per block -> 3 blocks
    c, gc = run(pad(q0), pad(emb))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b, c, atol=1e-6)
    assert torch.allclose(ga, gb, atol=1e-5) and torch.allclose(gb, gc, atol=1e-6)


def test_negatives_are_uniform_in_range():
    neg = sample_negatives(2000, 16, 7, torch.Generator().manual_seed(0))
    assert int(neg.min()) == 1 and int(neg.max()) == 7
    freq = torch.bincount(neg.flatten(), minlength=8)[1:].double() / neg.numel()
    assert torch.allclose(freq, torch.full((7,), 1 / 7, dtype=torch.float64), atol=0.01)


# ------------------------------------------------------------------ routes: sampled (fast) vs the reference routes

def _route_case(V=37, R=9, D=6, N=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(V, D, generator=g)
    table = torch.randn(N + 1, D, generator=g)
    pos = torch.randint(1, N + 1, (V,), generator=g)
    valid = torch.rand(V, generator=g) > 0.2
    return q, table, pos, valid


def _loss_and_grads(route, item_lookup="auto", seed=0, **kw):
    q, table, pos, valid = _route_case(seed=seed)
    q.requires_grad_(True)
    table.requires_grad_(True)
    fn = lambda ids: F.normalize(table[ids], dim=-1)  # noqa: E731  (the model's L2-normalised item vectors)
    loss = sampled_softmax_loss(q, pos, valid, fn, 23, 9, 0.05, torch.Generator().manual_seed(3), route=route,
                                item_lookup=item_lookup, **kw)
    loss.backward()
    return loss.detach(), q.grad, table.grad


def test_sampled_route_matches_reference_routes_value_and_gradients():
    # same generator -> same negatives (drawn per position, uniform), same loss and gradients on every route
    ref = _loss_and_grads("gather")
    for route, lookup in (("all_items", "auto"), ("sampled", "all"), ("sampled", "unique"), ("sampled", "auto")):
        got = _loss_and_grads(route, lookup)
        assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-5), (route, lookup)
        assert torch.allclose(got[1], ref[1], rtol=1e-4, atol=1e-5), (route, lookup)
        assert torch.allclose(got[2], ref[2], rtol=1e-4, atol=1e-5), (route, lookup)
    got = _loss_and_grads("sampled", "all", compile=True)  # loss.compile: the same loss and gradients
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, ref))
    assert ref[2].abs().sum() > 0 and ref[1].abs().sum() > 0


def test_sampled_dot_against_explicit_gather_forward_backward():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(41, 5, generator=g, requires_grad=True)  # 41 > GRAD_CHUNK_POSITIONS: several blocks
    table = torch.randn(13, 5, generator=g, requires_grad=True)
    idx = torch.randint(0, 13, (41, 7), generator=g)
    idx[0, :3] = 4  # repeated rows inside one position accumulate
    w = torch.randn(41, 7, generator=g)
    out = losses.sampled_dot(q, table, idx)
    (out * w).sum().backward()
    q2, t2 = q.detach().clone().requires_grad_(True), table.detach().clone().requires_grad_(True)
    ref = (t2[idx] * q2.unsqueeze(1)).sum(-1)
    (ref * w).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(q.grad, q2.grad, atol=1e-5)
    assert torch.allclose(table.grad, t2.grad, atol=1e-5)


def test_sampled_route_with_given_table_and_ids():
    # the sharded path hands over looked-up vectors of sorted unique ids (table_ids) or of all ids (row = id)
    q, table, pos, valid = _route_case(seed=2)
    neg = sample_negatives(int(valid.sum()), 9, 23, torch.Generator().manual_seed(5))
    ids = torch.unique(torch.cat([pos, neg.flatten()]))
    ref = sampled_softmax_loss(q, pos, valid, lambda i: table[i], 23, 9, 0.1, negatives=neg, route="gather")
    sub = sampled_softmax_loss(q, pos, valid, None, 23, 9, 0.1, negatives=neg, table=table[ids], table_ids=ids)
    full = sampled_softmax_loss(q, pos, valid, None, 23, 9, 0.1, negatives=neg, table=table)
    assert torch.allclose(sub, ref, atol=1e-5) and torch.allclose(full, ref, atol=1e-5)


def test_lookup_all_items_is_explicit():
    assert losses.lookup_all_items("all_items", "unique", 10**6, 128, 50)  # all_items always scores all
    assert losses.lookup_all_items("sampled", "all", 10**6, 128, 50)
    assert not losses.lookup_all_items("sampled", "unique", 10, 128, 50)
    assert losses.lookup_all_items("sampled", "auto", 3953, 128, 50)
    assert not losses.lookup_all_items("sampled", "auto", 7000, 128, 50)
    with pytest.raises(ValueError, match="loss.route"):
        losses.lookup_all_items("fast", "auto", 10, 1, 1)


def test_sampled_dot_compiled_table_gradient_matches_eager():
    # loss.compile: the item-table gradient through torch.compile (inductor) equals the eager blocked index_add_
    g = torch.Generator().manual_seed(4)
    q = torch.randn(53, 6, generator=g)
    table = torch.randn(17, 6, generator=g)
    idx = torch.randint(0, 17, (53, 5), generator=g)
    w = torch.randn(53, 5, generator=g)
    grads = []
    for compiled in (False, True):
        qq, tt = q.clone().requires_grad_(True), table.clone().requires_grad_(True)
        (losses.sampled_dot(qq, tt, idx, compiled) * w).sum().backward()
        grads.append((qq.grad, tt.grad))
    ref = torch.zeros_like(table).index_put_((idx,), w.unsqueeze(2) * q.unsqueeze(1), accumulate=True)
    assert torch.allclose(grads[0][1], ref, atol=1e-5) and torch.allclose(grads[1][1], ref, atol=1e-5)
    assert torch.allclose(grads[0][0], grads[1][0])


def test_reserved_positive_column_draws_the_same_negatives_without_a_copy():
    # sample_negatives(reserve_positive_column=True): the same generator stream as torch.randint, and the loss
    # writes the positives into the buffer's column 0 instead of concatenating
    from hstu.modules.losses import ids_with_positives

    plain = sample_negatives(37, 11, 19, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    view = sample_negatives(37, 11, 19, g, reserve_positive_column=True)
    assert torch.equal(plain, view) and not view.is_contiguous()
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state()) is False  # the stream advanced
    pos = torch.arange(37)
    ids = ids_with_positives(pos, view)
    assert ids.data_ptr() == view.data_ptr() - 8 and torch.equal(ids, torch.cat([pos[:, None], plain], 1))
    copied = ids_with_positives(pos, plain)  # a plain [V, R] tensor: concatenated
    assert torch.equal(copied, ids) and copied.data_ptr() != plain.data_ptr()
    # the loss is the same either way (same negatives)
    q = torch.randn(37, 6, generator=torch.Generator().manual_seed(1))
    table = torch.randn(20, 6, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(37, dtype=torch.bool)
    a = sampled_softmax_loss(q, pos % 19 + 1, valid, table.__getitem__, 19, 11, 0.5, negatives=plain)
    b = sampled_softmax_loss(q, pos % 19 + 1, valid, table.__getitem__, 19, 11, 0.5, negatives=view)
    assert torch.equal(a, b)
