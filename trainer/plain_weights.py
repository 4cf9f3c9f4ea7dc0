"""A model's weights as the PLAIN model's state_dict, from whatever wrote them, and loading them into a new run.

- :func:`iter_plain_tensors` yields ``(name, full tensor)`` one at a time from a ``torch.save`` state_dict file
  (best.pt) or a DCP checkpoint directory (trainer/checkpoint.py, keys ``model.*``; TorchRec-sharded tables are
  read back unsharded without a process group, any world size and sharding type). Names are the plain model's:
  the retrieval item collection -> ``item_embeddings.table.weight``, ranking collection tables -> ``tables.*``
  (trainer/parallel/ranking_embeddings.py), DMP/DDP wrapper prefixes dropped. Used by ``hstu export`` and by
  ``train.init_from``.
- :func:`load_plain_weights` loads such a source into a plain (not yet sharded) model, strictly: missing,
  unexpected or differently shaped tensors raise a ConfigError naming the source and the tensors.

So plain and sharded runs exchange weights in both directions (optimizer state does not carry over: the plain
path uses dense AdamW on the tables, the sharded path rowwise AdamW; resuming uses trainer/checkpoint.py).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Iterator, Tuple

import torch

from hstu.trainer.config import ConfigError

ITEM_KEY = "item_embeddings.table.weight"  # the plain RetrievalModel's item table
WRAPPER_PREFIXES = ("_dmp_wrapped_module.", "module.")  # DMP / DDP wrappers, if a state dict kept them


def _collection_key() -> str:
    try:
        from hstu.trainer.parallel.item_embeddings import COLLECTION_KEY

        return COLLECTION_KEY
    except ImportError:  # pragma: no cover - torchrec missing
        return "item_embeddings.collection.embeddings.item_id.weight"


def plain_name(name: str, coll: str = "") -> str:
    """A (possibly sharded, wrapped) model's state_dict name -> the plain model's (see module doc);
    ``coll``: the retrieval collection's key (``""``: not a sharded source)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    if coll and name == coll:
        return ITEM_KEY
    if ".collection.embeddings." in name:
        from hstu.trainer.parallel.ranking_embeddings import plain_name as ranking_plain_name

        return ranking_plain_name(name)
    return name


def iter_plain_tensors(source: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """(plain name, full tensor) of every model parameter/buffer in ``source`` (a state_dict file or a DCP
    checkpoint directory), one tensor in memory at a time."""
    if os.path.isfile(source):
        for name, t in torch.load(source, map_location="cpu", weights_only=True, mmap=True).items():
            yield plain_name(name), t
        return
    if not os.path.exists(os.path.join(source, ".metadata")):
        raise FileNotFoundError(f"checkpoint not found: {source} (expected a state_dict file or a DCP directory)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    coll = _collection_key()
    meta = dcp.FileSystemReader(source).read_metadata().state_dict_metadata
    for key, md in meta.items():
        if not (key.startswith("model.") and isinstance(md, TensorStorageMetadata)):
            continue
        target = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process": intended
            dcp.load(target, storage_reader=dcp.FileSystemReader(source), no_dist=True)
        yield plain_name(key[len("model."):], coll), target[key]


def load_plain_weights(model: torch.nn.Module, source: str, what: str = "train.init_from") -> Dict[str, int]:
    """Copy ``source``'s weights into the plain ``model`` in place (dtype cast to the model's); every tensor
    must match by name and shape. Returns {"tensors": n, "elements": total}."""
    if not os.path.exists(source):
        raise ConfigError(f"key '{what}': {source} does not exist (a best.pt / state_dict file or a DCP checkpoint "
                          "directory)")
    try:
        state = dict(iter_plain_tensors(source))
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise ConfigError(f"key '{what}': cannot read {source}: {e}") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"shapes (source vs this model) {shapes[:5]}" if shapes else ""]
        raise ConfigError(f"key '{what}': {source} does not fit this model (task/model config differ?): "
                          + "; ".join(p for p in parts if p))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])
    return {"tensors": len(own), "elements": sum(t.numel() for t in own.values())}


__all__ = ["ITEM_KEY", "iter_plain_tensors", "load_plain_weights", "plain_name"]
