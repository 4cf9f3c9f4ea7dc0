"""Batch preparation and the train pipeline (``sharding.pipeline``): what happens to a loader batch before the
model sees it, and the data position a checkpoint must record.

``prepare_batch``: Stochastic Length (``ctx.sl_generator``) → device → the task's part (``ctx.task.prepare_batch``,
trainer/tasks/): retrieval adds next-item labels and the negatives (``ctx.neg_generator``, on both paths: the
only place they are drawn), and on the sharded path the ids of the ONE table lookup of the step (``lookup_ids``,
``input_index``).

``BatchStream`` iterates one epoch of prepared batches. With ``prefetch`` (sharded path, pipeline=prefetch)
batch k+1 is prepared and its input dist (the ids all-to-all) started *before* batch k is trained, so the
communication overlaps batch k's compute — TorchRec's TrainPipelineSparseDist schedule, hand-rolled because
that class owns forward/backward/step and this loop checks the loss between forward and backward.
Preparation only draws from ``ctx.sl_generator``/``ctx.neg_generator`` (never the global RNG that dropout uses),
so prefetch on/off gives bit-identical training. ``position()`` is the data position after the last batch
handed out (loader state + generator states *before* any batch prepared ahead): what a checkpoint stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

import torch

from hstu.trainer.stochastic_length import apply_stochastic_length


@dataclass
class PreparedBatch:
    """A train batch ready for ``compute_loss`` (its JaggedBatch attributes read through, e.g. ``.item_ids``).
    batch: JaggedBatch on the device (after SL), T items; tokens = T. Retrieval (else None): labels [T], valid [T]
    bool, negatives [V, R] for the V valid positions; retrieval's sharded path only: lookup_ids [U], input_index
    [T]."""

    batch: Any
    tokens: int
    position: Optional[Dict[str, Any]] = None  # data position before this batch was drawn
    last: bool = False  # last batch of its epoch
    labels: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    negatives: Optional[torch.Tensor] = None
    lookup_ids: Optional[torch.Tensor] = None
    input_index: Optional[torch.Tensor] = None

    def __getattr__(self, name: str) -> Any:  # reads as the JaggedBatch too (item_ids, offsets, ...)
        if name == "batch":
            raise AttributeError(name)
        return getattr(self.batch, name)

    @property
    def num_valid(self) -> int:
        """Positions the loss averages over: valid next-item labels (retrieval), predicted item
        positions of a RankingBatch (ranking), else 0."""
        if self.valid is not None:
            return int(self.valid.sum())
        return int(getattr(self.batch, "num_predictions", 0))


def prepare_batch(batch: Any, ctx: Any) -> PreparedBatch:
    """Loader batch (CPU) -> PreparedBatch (see the module docstring). ``ctx``: the TrainContext."""
    cfg = ctx.cfg
    if cfg.train.stochastic_length.enabled:
        batch = apply_stochastic_length(batch, cfg.data.max_seq_len, cfg.train.stochastic_length.alpha,
                                        ctx.sl_generator)
    batch = batch.to(ctx.device)
    out = PreparedBatch(batch=batch, tokens=batch.num_events)  # JaggedBatch: items; RankingBatch: tokens
    return ctx.task.prepare_batch(out, ctx)  # the task's part (retrieval, sharded: labels, negatives, lookup ids)


def capture_position(loader: Any, ctx: Any) -> Dict[str, Any]:
    """Loader state (global: the same on every rank) + this rank's SL / negative generator states."""
    return {"loader": loader.state_dict(), "neg_generator": ctx.neg_generator.get_state(),
            "sl_generator": ctx.sl_generator.get_state()}


class DataPosition:
    """The data position as checkpoint state objects (trainer/checkpoint_manager.py): ``loader`` (global, in
    the checkpoint's meta) and ``generators`` (this rank's SL / negative generator states, in its RNG file).
    ``saved``: the position the next checkpoint records (set by the loop from ``BatchStream.position()``, which
    excludes a batch prepared ahead); None: the live one."""

    def __init__(self, loader: Any, ctx: Any) -> None:
        self.train_loader, self.ctx = loader, ctx
        self.saved: Optional[Dict[str, Any]] = None
        self.loader, self.generators = _LoaderView(self), _GeneratorView(self)

    def current(self) -> Dict[str, Any]:
        return self.saved if self.saved is not None else capture_position(self.train_loader, self.ctx)


class _LoaderView:
    def __init__(self, position: DataPosition) -> None:
        self.position = position

    def state_dict(self) -> Dict[str, Any]:
        return self.position.current()["loader"]

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.position.train_loader.load_state_dict(state)


class _GeneratorView:
    NAMES = ("neg_generator", "sl_generator")

    def __init__(self, position: DataPosition) -> None:
        self.position = position

    def state_dict(self) -> Dict[str, Any]:
        current = self.position.current()
        return {name: current[name] for name in self.NAMES}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name in self.NAMES:
            if name in state:
                getattr(self.position.ctx, name).set_state(state[name])


class BatchStream:
    """One epoch of PreparedBatch from ``ctx.train_loader``; see the module docstring."""

    def __init__(self, ctx: Any, prefetch: bool = False) -> None:
        self.ctx, self.prefetch = ctx, prefetch
        self.loader = ctx.train_loader
        self._ahead: Optional[PreparedBatch] = None

    def __len__(self) -> int:
        state = self.loader.state_dict()
        return len(self.loader) - state["batches_consumed"]

    def _draw(self, it: Iterator[Any]) -> Optional[PreparedBatch]:
        position = capture_position(self.loader, self.ctx)
        raw = next(it, None)
        if raw is None:
            return None
        prepared = prepare_batch(raw, self.ctx)
        prepared.position = position
        prepared.last = position["loader"]["batches_consumed"] + 1 >= len(self.loader)
        return prepared

    def position(self) -> Dict[str, Any]:
        """Data position after the batches handed out so far (a batch prepared ahead is not counted)."""
        if self._ahead is not None:
            return self._ahead.position
        return capture_position(self.loader, self.ctx)

    def __iter__(self) -> Iterator[PreparedBatch]:
        it = iter(self.loader)
        embeddings = self.ctx.item_embeddings
        cur = self._draw(it)
        try:
            while cur is not None:
                if self.prefetch and not cur.last:
                    self._ahead = self._draw(it)
                    if self._ahead is not None and embeddings is not None:
                        embeddings.prefetch(self._ahead.lookup_ids)
                yield cur
                cur, self._ahead = (self._ahead, None) if self.prefetch else (self._draw(it), None)
        finally:
            if self._ahead is not None and embeddings is not None:
                embeddings.drop_prefetch()  # stopped early (max_steps): finish the started collective
