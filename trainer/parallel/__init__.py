"""TorchRec sharding of the item table with a fused rowwise AdamW (docs/rowwise_adamw.md).

Import submodules directly (``hstu.trainer.parallel.sharding``, ``.rowwise_adamw``, ``.config``); this package
init stays import-light so ``hstu.trainer`` works without torchrec.
"""
