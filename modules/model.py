"""RetrievalModel: item-embedding stage + jagged sequence encoder (HSTU | SASRec) + optional L2 normalisation.

The batch is duck-typed (any object with ``item_ids [T]``, ``timestamps [T]``, ``offsets [B+1]``, ``max_len``
and optionally ``target_timestamps [B]``, e.g. ``hstu.trainer.data.batch.JaggedBatch``); nothing from the data
package is imported. The encoder (dense tower) holds no item table, so ``embed_items`` can later be swapped for
a TorchRec EmbeddingCollection and ``encode_embeddings`` called with its output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch
import torch.nn as nn

from hstu.modules.embeddings import ItemEmbeddings
from hstu.modules.hstu import HSTUEncoder
from hstu.modules.item_tower import ItemTower, build_item_tower
from hstu.modules.sasrec import SASRecEncoder
from hstu.ops.backend import BackendLike

if TYPE_CHECKING:
    from hstu.trainer.config import ModelConfig, RunConfig

L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / max(‖x‖₂, eps) along the last dim (GR L2NormEmbeddingPostprocessor)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def build_encoder(model_cfg: "ModelConfig", max_seq_len: int, ops_backend: BackendLike = "pytorch") -> nn.Module:
    """``model.arch`` hstu -> :class:`HSTUEncoder` (``model.variant`` research | production), sasrec -> SASRec."""
    if model_cfg.arch == "hstu":
        return HSTUEncoder(model_cfg, max_seq_len, ops_backend)
    if model_cfg.arch == "sasrec":
        return SASRecEncoder(model_cfg, max_seq_len, ops_backend)
    raise ValueError(f"model.arch must be hstu | sasrec, got {model_cfg.arch!r}")


class RetrievalModel(nn.Module):
    """Two-tower-style retrieval model: user vectors from the sequence encoder, item vectors from the item table
    (with ``item_features``: from the item tower over the id embedding and the content features)."""

    def __init__(self, model_cfg: "ModelConfig", num_items: int, max_seq_len: int,
                 ops_backend: BackendLike = "pytorch", item_features: Any = None) -> None:
        super().__init__()
        self.num_items, self.l2_norm_output = num_items, model_cfg.l2_norm_output
        self.item_embeddings = ItemEmbeddings(num_items, model_cfg.embedding_dim)
        self.encoder = build_encoder(model_cfg, max_seq_len, ops_backend)
        # an ItemFeatureTable (trainer/data/item_features.py) or alike -> the item tower
        self.item_tower: Optional[ItemTower] = build_item_tower(model_cfg, item_features, num_items)

    def embed_items(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N] -> [N, D] raw item embeddings (the input tokens, also the output item vectors): the id table,
        or the item tower over it when the model has item features."""
        emb = self.item_embeddings(ids)
        return emb if self.item_tower is None else self.item_tower(ids, emb)

    def encode_embeddings(self, item_embeddings: torch.Tensor, batch: Any) -> torch.Tensor:
        """Dense tower only: already-looked-up item embeddings [T, D] of ``batch`` -> sequence embeddings [T, D]."""
        out = self.encoder(item_embeddings, batch.offsets, int(batch.max_len), batch.timestamps,
                           getattr(batch, "target_timestamps", None))
        return l2_normalize(out) if self.l2_norm_output else out

    def encode(self, batch: Any) -> torch.Tensor:
        """JaggedBatch -> [T, D] sequence embeddings (L2-normalised when model.l2_norm_output). Position i sees
        items ≤ i only; the last position uses batch.target_timestamps (when present) as its query time."""
        return self.encode_embeddings(self.embed_items(batch.item_ids), batch)

    def forward(self, batch: Any, lookup_ids: torch.Tensor, input_index: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training entry point (a single call, so DDP / DMP wrappers see it): ONE item-table lookup feeds both
        towers. lookup_ids [U] int64 (e.g. the unique ids of the batch and its negatives), input_index [T]: the
        position in lookup_ids of each batch item. Returns (sequence embeddings [T, D] as ``encode(batch)``,
        item vectors of lookup_ids [U, D] as ``item_vectors(lookup_ids)``)."""
        raw = self.embed_items(lookup_ids)  # [U, D]
        seq = self.encode_embeddings(raw[input_index], batch)
        return seq, (l2_normalize(raw) if self.l2_norm_output else raw)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N] -> [N, D] output-side item vectors (L2-normalised when model.l2_norm_output)."""
        emb = self.embed_items(ids)
        return l2_normalize(emb) if self.l2_norm_output else emb

    def user_vectors(self, batch: Any) -> torch.Tensor:
        """JaggedBatch -> [B, D]: the encoding at the last position of each sequence (zeros for empty ones)."""
        enc = self.encode(batch)
        offsets = batch.offsets.long()
        last = offsets[1:] - 1
        nonempty = (offsets[1:] > offsets[:-1]).unsqueeze(1)
        if enc.size(0) == 0:
            return enc.new_zeros(last.numel(), enc.size(1))
        return enc[last.clamp(min=0)] * nonempty.to(enc.dtype)


def build_model(cfg: "RunConfig", num_items: int, item_features: Any = None) -> RetrievalModel:
    """RunConfig -> RetrievalModel (arch from cfg.model.arch, history cap cfg.data.max_seq_len, cfg.ops.backend);
    ``item_features`` (an ItemFeatureTable) is required when model.item_features.enabled, ignored otherwise."""
    if cfg.model.item_features.enabled and item_features is None:
        raise ValueError("model.item_features.enabled=true: build_model needs the item feature table")
    return RetrievalModel(cfg.model, num_items, cfg.data.max_seq_len, cfg.ops.backend,
                          item_features if cfg.model.item_features.enabled else None)
