"""A model's weights as the PLAIN model's state_dict, from whatever wrote them, and loading them into a new run.

- :func:`iter_plain_tensors` yields ``(name, full tensor)`` one at a time from a ``torch.save`` state_dict file
  (best.pt) or a DCP checkpoint directory (trainer/checkpoint.py, keys ``model.*``; TorchRec-sharded tables are
  read back unsharded without a process group, any world size and sharding type). Names are the plain model's:
  the retrieval item collection -> ``item_embeddings.table.weight``, ranking collection tables -> ``tables.*``
  (trainer/parallel/ranking_embeddings.py), DMP/DDP wrapper prefixes dropped. Used by ``hstu export`` and by
  ``train.init_from``.
- :func:`read_plain_state` verifies a source first (trainer/integrity.py: a DCP step directory's manifest, a
  best.pt's sidecar; a checkpoint directory resolves to its newest step that verifies) and turns any read
  failure (truncated file, not a checkpoint at all) into a one-line CheckpointError.
- :func:`load_plain_weights` loads such a source into a plain (not yet sharded) model, strictly: missing,
  unexpected or differently shaped tensors raise a CheckpointError (a ConfigError) naming the source and a few
  of the tensors of each kind.

So plain and sharded runs exchange weights in both directions (optimizer state does not carry over: the plain
path uses dense AdamW on the tables, the sharded path rowwise AdamW; resuming uses trainer/checkpoint.py).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Iterator, Sequence, Tuple

import torch

from hstu.trainer.integrity import CheckpointError, describe_mismatch, verify_source

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
    if name.startswith("item_tower.tables.collection."):  # retrieval item-tower feature tables
        from hstu.trainer.parallel.item_features import plain_feature_name

        return plain_feature_name(name)
    if ".collection.embeddings." in name:
        from hstu.trainer.parallel.ranking_embeddings import plain_name as ranking_plain_name

        return ranking_plain_name(name)
    return name


def iter_plain_tensors(source: str, skip: Sequence[str] = ()) -> Iterator[Tuple[str, torch.Tensor]]:
    """(plain name, full tensor) of every model parameter/buffer in ``source`` (a state_dict file or a DCP
    checkpoint directory), one tensor in memory at a time; plain names in ``skip`` are not read (``hstu export``
    streams the item table instead: serving/table_stream.py)."""
    if os.path.isfile(source):
        for name, t in torch.load(source, map_location="cpu", weights_only=True, mmap=True).items():
            if plain_name(name) not in skip:
                yield plain_name(name), t
        return
    if not os.path.exists(os.path.join(source, ".metadata")):
        raise FileNotFoundError(f"checkpoint not found: {source} (expected a state_dict file or a DCP directory)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from hstu.trainer.dcp_reader import RowRangeReader

    coll = _collection_key()
    meta = dcp.FileSystemReader(source).read_metadata().state_dict_metadata
    for key, md in meta.items():
        if not (key.startswith("model.") and isinstance(md, TensorStorageMetadata)):
            continue
        if plain_name(key[len("model."):], coll) in skip:
            continue
        target = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process": intended
            dcp.load(target, storage_reader=RowRangeReader(source), no_dist=True)  # no whole-blob temporaries
        yield plain_name(key[len("model."):], coll), target[key]


def read_plain_state(source: str, what: str = "checkpoint", verify: bool = True,
                     skip: Sequence[str] = ()) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(the verified path, {plain name: full tensor}) of ``source``: a state_dict file, a DCP step directory or
    a checkpoint directory (its newest step that verifies). Raises CheckpointError naming ``what`` and the path.
    ``verify=False``: ``source`` was verified already (integrity.resolve_run_checkpoint); ``skip``: plain names
    left out."""
    path = source
    if verify:
        try:
            path = verify_source(source)
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None
    try:
        return path, dict(iter_plain_tensors(path, skip))
    except Exception as e:  # noqa: BLE001 - unpickling / zip / DCP failures of a file that is not a checkpoint
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise CheckpointError(f"{what}: cannot read {path} as a checkpoint (a best.pt / state_dict file or a DCP "
                              f"checkpoint directory): {type(e).__name__}: {first}") from None


def check_fits(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], source: str, what: str) -> None:
    """Raise CheckpointError unless ``state`` has exactly ``own``'s names and shapes (a few of each kind of
    difference are named, then "and N more")."""
    diff = describe_mismatch({k: tuple(v.shape) for k, v in own.items()},
                             {k: tuple(v.shape) for k, v in state.items()})
    if diff:
        raise CheckpointError(f"{what}: {source} does not fit this model (task/model config differ?): {diff}")


def load_plain_weights(model: torch.nn.Module, source: str, what: str = "train.init_from") -> Dict[str, int]:
    """Copy ``source``'s weights into the plain ``model`` in place (dtype cast to the model's); every tensor
    must match by name and shape. Returns {"tensors": n, "elements": total, "source": the path loaded} (a
    checkpoint directory: its newest step that verifies)."""
    if not os.path.exists(source):
        raise CheckpointError(f"key '{what}': {source} does not exist (a best.pt / state_dict file or a DCP "
                              "checkpoint directory)")
    path, state = read_plain_state(source, f"key '{what}'")
    own = model.state_dict()
    check_fits(own, state, path, f"key '{what}'")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])
    return {"tensors": len(own), "elements": sum(t.numel() for t in own.values()), "source": path}


__all__ = ["ITEM_KEY", "check_fits", "iter_plain_tensors", "load_plain_weights", "plain_name", "read_plain_state"]
