"""Retrieval training loss: sampled softmax over uniform negatives at every position (hstu-spec.md).

For each valid position i with sequence embedding q_i and positive (next) item p_i::

    logits_i = [q_i·v(p_i), q_i·v(n_i1), ..., q_i·v(n_iR)] / temperature
    loss     = mean_i CE(logits_i, 0)

with R negatives n_ij drawn uniformly from 1..num_items *separately per position*; a negative equal to the
positive is masked (logit −inf, it contributes nothing). Vectors are used as given: L2 normalisation belongs to
the model (``RetrievalModel.encode`` / ``item_vectors``).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

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
) -> torch.Tensor:
    """Uniform negatives [num_positions, num_negatives] in 1..num_items, drawn on the generator's device."""
    gen_device = generator.device if generator is not None else device
    neg = torch.randint(1, num_items + 1, (num_positions, num_negatives), generator=generator, device=gen_device)
    return neg.to(device) if device is not None else neg


MATMUL_CHUNK_ELEMENTS = 1 << 25  # max [rows, num_items+1] score block held at once in the all-items route


def all_items_route(num_items: int, num_negatives: int, dim: int) -> bool:
    """True when negatives are scored via all items (catalog num_items + 1 <= R·D), see ``_negative_logits``."""
    return num_items + 1 <= num_negatives * dim


def _negative_logits(
    q: torch.Tensor, neg: torch.Tensor, item_vectors_fn: ItemVectorsFn, num_items: int
) -> torch.Tensor:
    """q [V, D], neg [V, R] -> q·v(neg) [V, R].

    Two equivalent routes, picked by cost: when the catalog is smaller than R·D, score all items with one
    matmul per block of rows and gather (only the gather index is saved for backward: memory O(block·N));
    otherwise look up the unique negatives once and gather R vectors per position ([V, R, D]).
    """
    V, R = neg.shape
    if all_items_route(num_items, R, q.shape[-1]):
        all_vecs = item_vectors_fn(torch.arange(num_items + 1, device=q.device))  # [N+1, D]
        rows = max(1, MATMUL_CHUNK_ELEMENTS // (num_items + 1))
        parts = [(q[i:i + rows] @ all_vecs.t()).gather(1, neg[i:i + rows]) for i in range(0, V, rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    uniq, inverse = torch.unique(neg, return_inverse=True)
    vecs = item_vectors_fn(uniq)  # [U, D]: normalisation etc. once per distinct item
    return (F.embedding(inverse, vecs) * q.unsqueeze(1)).sum(-1)


def sampled_softmax_loss(
    seq_emb: torch.Tensor,
    pos_ids: torch.Tensor,
    valid: torch.Tensor,
    item_vectors_fn: ItemVectorsFn,
    num_items: int,
    num_negatives: int,
    temperature: float,
    generator: Optional[torch.Generator] = None,
    *,
    negatives: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sampled-softmax next-item loss averaged over valid positions (scalar; 0 with a graph if none is valid).

    Args:
        seq_emb: [T, D] sequence embeddings (query side, as the model returns them).
        pos_ids: [T] int64 positive (next) item ids; only positions with ``valid`` are used.
        valid: [T] bool.
        item_vectors_fn: ids [N] -> [N, D] output item vectors (e.g. ``model.item_vectors``).
        num_items: negatives are drawn uniformly from 1..num_items.
        num_negatives: R negatives per position, drawn separately for each valid position.
        temperature: logits are divided by it.
        generator: optional torch.Generator for reproducible negatives.
        negatives: optional explicit [V, R] negatives for the V valid positions (tests, analysis).
    """
    q = seq_emb[valid]
    pos = pos_ids[valid]
    if q.shape[0] == 0:
        return seq_emb.sum() * 0.0
    if negatives is None:
        negatives = sample_negatives(q.shape[0], num_negatives, num_items, generator, q.device)
    negatives = negatives.to(q.device)
    q = q.float()
    pos_logit = (q * item_vectors_fn(pos).float()).sum(-1, keepdim=True)  # [V, 1]
    neg_logits = _negative_logits(q, negatives, lambda ids: item_vectors_fn(ids).float(), num_items)  # [V, R]
    neg_logits = neg_logits.masked_fill(negatives == pos.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit, neg_logits], dim=1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)
