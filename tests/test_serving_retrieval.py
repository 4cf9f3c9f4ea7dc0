"""Chunked top-K over the catalog (serving/retrieval.py) == brute force; deterministic ties; quantised tables."""

import pytest
import torch

from hstu.serving.retrieval import ItemTable, brute_force_topk, topk_inner_product


def _table(rows=1001, dim=12, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("l2", [True, False])
def test_chunked_topk_equals_brute_force(dtype, l2):
    table = ItemTable.quantize(_table(), dtype, l2_norm=l2)
    q = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    ref = brute_force_topk(q, table, 25)
    for chunk in (1, 7, 100, 999, 1000, 5000):
        got = topk_inner_product(q, table, 25, chunk_size=chunk)
        assert torch.equal(got.ids, ref.ids), chunk
        torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
    single = topk_inner_product(q[1], table, 25, chunk_size=64)
    assert torch.equal(single.ids, ref.ids[1]) and single.ids.shape == (25,)
    assert int(ref.ids.min()) >= 1  # row 0 (padding) is never retrieved


def test_scores_are_inner_products_with_output_vectors():
    w = _table(50, 8)
    table = ItemTable.quantize(w, "fp32")
    q = torch.randn(8)
    top = topk_inner_product(q, table, 49, chunk_size=16)
    vec = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(top.scores, vec[top.ids] @ q, rtol=1e-5, atol=1e-6)
    assert torch.all(top.scores[:-1] >= top.scores[1:])


def test_ties_are_broken_by_smaller_id_whatever_the_chunking():
    w = torch.zeros(41, 4)
    w[1:, 0] = torch.tensor([float(i % 3) for i in range(1, 41)])  # exact small integers: many exact ties
    table = ItemTable.quantize(w, "fp32", l2_norm=False)
    q = torch.tensor([1.0, 0.0, 0.0, 0.0])
    expected = [i for i in range(1, 41) if i % 3 == 2] + [i for i in range(1, 41) if i % 3 == 1]
    for chunk in (1, 2, 3, 5, 8, 13, 40, 100):
        for k in (1, 4, 13, 20, 27, 40):
            top = topk_inner_product(q, table, k, chunk_size=chunk)
            assert top.ids.tolist() == (expected + [i for i in range(1, 41) if i % 3 == 0])[:k], (chunk, k)
            assert torch.equal(top.ids, brute_force_topk(q, table, k).ids)


def test_exclude_and_k_larger_than_catalog():
    table = ItemTable.quantize(_table(30, 6), "fp32")
    q = torch.randn(6)
    full = topk_inner_product(q, table, 100)
    assert full.ids.shape == (29,) and sorted(full.ids.tolist()) == list(range(1, 30))
    excl = full.ids[:3]
    top = topk_inner_product(q, table, 5, chunk_size=4, exclude=[excl])
    assert top.ids.tolist() == full.ids[3:8].tolist()
    with pytest.raises(ValueError, match="one id list per query"):
        topk_inner_product(torch.randn(2, 6), table, 5, exclude=[excl])


def test_quantised_tables_approximate_fp32():
    w = _table(2000, 32)
    ref = ItemTable.quantize(w, "fp32")
    q = torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
    truth = brute_force_topk(q, ref, 50)
    for dtype, tol in (("bf16", 2e-2), ("int8", 2e-2)):
        t = ItemTable.quantize(w, dtype)
        assert t.weight.dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[dtype]
        torch.testing.assert_close(t.vectors(torch.arange(2000)), ref.vectors(torch.arange(2000)), atol=tol, rtol=0)
        got = topk_inner_product(q, t, 50, chunk_size=300)
        overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got.ids, truth.ids)) / (4 * 50)
        assert overlap > 0.9, (dtype, overlap)
    with pytest.raises(ValueError, match="embedding dtype"):
        ItemTable.quantize(w, "fp8")
