"""Retrieval training loss: sampled softmax over uniform negatives at every position (hstu-spec.md).

For each valid position i with sequence embedding q_i and positive (next) item p_i::

    logits_i = [q_i·v(p_i), q_i·v(n_i1), ..., q_i·v(n_iR)] / temperature
    loss     = mean_i CE(logits_i, 0)

with R negatives n_ij drawn uniformly from 1..num_items *separately per position*; a negative equal to the
positive is masked (logit −inf, it contributes nothing). Vectors are used as given: L2 normalisation belongs to
the model (``RetrievalModel.encode`` / ``item_vectors``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from hstu.ops.backend import Backend, BackendLike, resolve_backend

ItemVectorsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [N] int64 -> vectors [N, D]


def next_item_labels(item_ids: torch.Tensor, offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal next-item labels of a jagged batch.

    Args: item_ids [T] int64, offsets [B+1] int64 (sequence b is [offsets[b], offsets[b+1])).
    Returns: (labels [T] int64, valid [T] bool); label i = item_ids[i+1] inside the same sequence, the last
    position of each sequence gets label 0 and valid False (so do positions whose next item is padding 0).
    """
    labels = torch.zeros_like(item_ids)
    if item_ids.numel() > 1:
        labels[:-1] = item_ids[1:]
    lengths = offsets[1:] - offsets[:-1]
    last = (offsets[1:] - 1)[lengths > 0]
    labels[last] = 0
    return labels, labels > 0


def sample_negatives(
    num_positions: int,
    num_negatives: int,
    num_items: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    reserve_positive_column: bool = False,
) -> torch.Tensor:
    """Uniform negatives [num_positions, num_negatives] in 1..num_items, drawn on the generator's device.

    reserve_positive_column: return columns 1.. of a [num_positions, num_negatives + 1] buffer, so the loss can
    write the positives into column 0 instead of concatenating (:func:`ids_with_positives`); the same draws as
    ``torch.randint`` (same generator stream, same order)."""
    gen_device = generator.device if generator is not None else device
    if reserve_positive_column:
        buf = torch.empty(num_positions, num_negatives + 1, dtype=torch.long, device=gen_device)
        neg = buf[:, 1:].random_(1, num_items + 1, generator=generator)
    else:
        neg = torch.randint(1, num_items + 1, (num_positions, num_negatives), generator=generator, device=gen_device)
    return neg.to(device) if device is not None else neg


def ids_with_positives(pos: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """[V, R + 1] ids, column 0 = pos [V], columns 1.. = negatives [V, R]. When negatives are columns 1.. of their
    own [V, R + 1] buffer (``sample_negatives(..., reserve_positive_column=True)``) the positives are written into
    its column 0 and the buffer is returned (no copy of the [V, R] ids); otherwise a concatenation."""
    base = negatives._base
    if (base is not None and base.dim() == 2 and base.is_contiguous() and base.dtype == pos.dtype
            and base.device == pos.device and tuple(base.shape) == (negatives.shape[0], negatives.shape[1] + 1)
            and negatives.stride() == base.stride() and negatives.storage_offset() == base.storage_offset() + 1):
        base[:, 0] = pos
        return base
    return torch.cat([pos.unsqueeze(1), negatives], dim=1)


MATMUL_CHUNK_ELEMENTS = 1 << 25  # max [rows, num_items+1] score block held at once in the all-items route
GRAD_CHUNK_POSITIONS = 16  # positions per index_add_ block in the sampled route's item-table gradient

ROUTES = ("sampled", "all_items", "gather")  # loss.route: how the R + 1 logits per position are computed
LOOKUPS = ("auto", "all", "unique")  # loss.item_lookup: which item vectors are looked up for them


def all_items_route(num_items: int, num_negatives: int, dim: int) -> bool:
    """The ``item_lookup: auto`` rule: look up all num_items + 1 vectors when the catalog is at most R·D rows
    (cheaper than de-duplicating V·R sampled ids), else only the unique ids of the batch and its negatives."""
    return num_items + 1 <= num_negatives * dim


def lookup_all_items(route: str, item_lookup: str, num_items: int, num_negatives: int, dim: int) -> bool:
    """Whether the loss's item vectors are the whole table (ids 0..N) rather than the unique ids it needs:
    always for ``route: all_items``; ``item_lookup`` all / unique; auto -> :func:`all_items_route`."""
    if route not in ROUTES:
        raise ValueError(f"loss.route must be one of {ROUTES}, got {route!r}")
    if item_lookup not in LOOKUPS:
        raise ValueError(f"loss.item_lookup must be one of {LOOKUPS}, got {item_lookup!r}")
    if route == "all_items" or item_lookup == "all":
        return True
    return item_lookup == "auto" and all_items_route(num_items, num_negatives, dim)


class _SampledDot(torch.autograd.Function):
    """logits [V, K] = (q [V, D] · table[idx] [V, K, D]).sum(-1) without materialising [V, K, D] or [V, U].

    Forward: one sampled dense-dense matmul (``torch.sparse.sampled_addmm`` on the CSR pattern of idx);
    backward: dq = Σ_k g[v, k]·table[idx[v, k]] (``embedding_bag`` with per-sample weights, fbgemm on CPU) and
    dtable[u] = Σ_{idx[v, k] = u} g[v, k]·q[v]: eager, ``index_add_`` over small blocks of positions (the
    [block·K, D] products stay in cache); compiled (``loss.compile``), one inductor loop (~4x faster on CPU).
    Work: 3·V·K·D multiply-adds, as the definition."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, compiled: bool) -> torch.Tensor:
        V, K = idx.shape
        ctx.save_for_backward(q, table, idx)
        ctx.compiled = compiled
        if K > table.shape[0]:  # sampled_addmm needs row nnz <= columns (tiny tables only): plain gather
            return torch.bmm(table[idx], q.unsqueeze(2)).squeeze(2)
        crow = torch.arange(0, V * K + 1, K, device=idx.device)
        with warnings.catch_warnings():  # "CSR support is in beta" / "invariant checks disabled": idx is valid
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), q.new_zeros(V * K), (V, table.shape[0]))
            return torch.sparse.sampled_addmm(pattern, q, table.t(), beta=0.0).values().view(V, K)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, table, idx = ctx.saved_tensors
        grad = grad.contiguous()
        dq = dtable = None
        if ctx.needs_input_grad[0]:
            dq = F.embedding_bag(idx, table, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            dtable = (_compiled_table_grad() if ctx.compiled else _table_grad)(q, grad, idx, torch.zeros_like(table))
        return dq, dtable, None, None


def _table_grad(q: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Eager: out[idx[v, k]] += grad[v, k]·q[v], index_add_ over blocks of GRAD_CHUNK_POSITIONS positions."""
    D, c = q.shape[1], GRAD_CHUNK_POSITIONS
    for i in range(0, idx.shape[0], c):
        out.index_add_(0, idx[i:i + c].reshape(-1), (grad[i:i + c].unsqueeze(2) * q[i:i + c].unsqueeze(1)).reshape(-1, D))
    return out


def _table_grad_fused(q: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The same sum as one accumulate; under torch.compile inductor emits one loop that never materialises the
    [V, K, D] products."""
    return out.index_put_((idx,), grad.unsqueeze(2) * q.unsqueeze(1), accumulate=True)


_COMPILED: dict = {}


def _compiled_table_grad():
    """torch.compile(_table_grad_fused), built once per process (dynamic shapes: one graph for every batch).
    Its C++ loop runs on one thread (cpp.threads 1): with 2 OpenMP threads the float atomic adds into the same
    table contend and the kernel was ~20x slower on a 2-core CPU."""
    if "table_grad" not in _COMPILED:
        _COMPILED["table_grad"] = torch.compile(_table_grad_fused, dynamic=True, options={"cpp.threads": 1})
    return _COMPILED["table_grad"]


def sampled_dot(q: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """q [V, D], table [U, D], idx [V, K] int64 rows of table -> q[v]·table[idx[v, k]] [V, K] (autograd to q and
    table); cost O(V·K·D), see :class:`_SampledDot`. compiled: the table gradient through torch.compile."""
    return _SampledDot.apply(q.contiguous(), table.contiguous(), idx.long().contiguous(), compiled)


def _negative_logits(
    q: torch.Tensor, neg: torch.Tensor, item_vectors_fn: ItemVectorsFn, num_items: int, route: str
) -> torch.Tensor:
    """Reference routes, q [V, D], neg [V, R] -> q·v(neg) [V, R]. all_items: score all items with one matmul per
    block of rows and gather (only the gather index is saved for backward: memory O(block·N)); gather: look up
    the unique negatives once and gather R vectors per position ([V, R, D])."""
    if route == "all_items":
        all_vecs = item_vectors_fn(torch.arange(num_items + 1, device=q.device))  # [N+1, D]
        rows = max(1, MATMUL_CHUNK_ELEMENTS // (num_items + 1))
        parts = [(q[i:i + rows] @ all_vecs.t()).gather(1, neg[i:i + rows]) for i in range(0, neg.shape[0], rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    uniq, inverse = torch.unique(neg, return_inverse=True)
    vecs = item_vectors_fn(uniq)  # [U, D]: normalisation etc. once per distinct item
    return (F.embedding(inverse, vecs) * q.unsqueeze(1)).sum(-1)


def sampled_softmax_loss(
    seq_emb: torch.Tensor,
    pos_ids: torch.Tensor,
    valid: torch.Tensor,
    item_vectors_fn: Optional[ItemVectorsFn],
    num_items: int,
    num_negatives: int,
    temperature: float,
    generator: Optional[torch.Generator] = None,
    *,
    negatives: Optional[torch.Tensor] = None,
    route: str = "sampled",
    item_lookup: str = "auto",
    table: Optional[torch.Tensor] = None,
    table_ids: Optional[torch.Tensor] = None,
    compile: bool = False,
    backend: BackendLike = "pytorch",
) -> torch.Tensor:
    """Sampled-softmax next-item loss averaged over valid positions (scalar; 0 with a graph if none is valid).

    Args:
        seq_emb: [T, D] sequence embeddings (query side, as the model returns them).
        pos_ids: [T] int64 positive (next) item ids; only positions with ``valid`` are used.
        valid: [T] bool.
        item_vectors_fn: ids [N] -> [N, D] output item vectors (e.g. ``model.item_vectors``); may be None when
            ``table`` is given.
        num_items: negatives are drawn uniformly from 1..num_items.
        num_negatives: R negatives per position, drawn separately for each valid position.
        temperature: logits are divided by it.
        generator: optional torch.Generator for reproducible negatives.
        negatives: optional explicit [V, R] negatives for the V valid positions (tests, analysis).
        route: ``sampled`` (default: R + 1 dot products per position, :func:`sampled_dot`), ``all_items``
            (score every item, gather) or ``gather`` ([V, R, D] gather) — the same value and gradients.
        item_lookup: sampled route, which vectors are looked up (:func:`lookup_all_items`): all ids 0..N or the
            unique ids of positives and negatives.
        table, table_ids: already looked-up item vectors [U, D] of the sorted ids table_ids [U] (None: table
            row = item id, U = num_items + 1), instead of calling item_vectors_fn.
        compile: sampled route, compute the item-table gradient with torch.compile (else eager; same sums).
        backend: ``ops.backend``; ``cpu`` runs the sampled route as one fused C++ op (ops/cpu/sampled_softmax.py:
            dots, mask, log-sum-exp and both gradients; the same value and gradients within float rounding).
    """
    rows = valid.nonzero().squeeze(1)  # index_select: its backward is an index_add_ of unique rows, several times
    q = seq_emb.index_select(0, rows)  # cheaper than a boolean mask's accumulating index_put_ (same values)
    pos = pos_ids.index_select(0, rows)
    if q.shape[0] == 0:
        return seq_emb.sum() * 0.0 + (table.sum() * 0.0 if table is not None else 0.0)
    if negatives is None:
        negatives = sample_negatives(q.shape[0], num_negatives, num_items, generator, q.device)
    negatives = negatives.to(q.device)
    q = q.float()
    if route != "sampled":
        fn = item_vectors_fn
        if table is not None:
            fn = table.__getitem__ if table_ids is None else (lambda ids: table[torch.searchsorted(table_ids, ids)])
        vec_fn = lambda ids: fn(ids).float()  # noqa: E731
        pos_logit = (q * vec_fn(pos)).sum(-1, keepdim=True)  # [V, 1]
        if route not in ROUTES:
            raise ValueError(f"loss.route must be one of {ROUTES}, got {route!r}")
        neg_logits = _negative_logits(q, negatives, vec_fn, num_items, route)  # [V, R]
        logits = torch.cat([pos_logit, neg_logits], dim=1)
    else:
        ids = ids_with_positives(pos, negatives)  # [V, R + 1], column 0 = the positive
        if table is not None:
            idx = ids if table_ids is None else torch.searchsorted(table_ids, ids)
        elif lookup_all_items(route, item_lookup, num_items, negatives.shape[1], q.shape[1]):
            table, idx = item_vectors_fn(torch.arange(num_items + 1, device=q.device)), ids
        else:
            uniq, idx = torch.unique(ids, return_inverse=True)
            table = item_vectors_fn(uniq)
        if resolve_backend(backend) == Backend.CPU:
            from hstu.ops.cpu.sampled_softmax import cpu_sampled_softmax_loss

            return cpu_sampled_softmax_loss(q, table, idx, temperature)
        logits = sampled_dot(q, table.float(), idx, compile)  # [V, R + 1]
    neg_mask = torch.cat([torch.zeros_like(pos, dtype=torch.bool).unsqueeze(1), negatives == pos.unsqueeze(1)], 1)
    logits = logits.masked_fill(neg_mask, float("-inf")) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)
