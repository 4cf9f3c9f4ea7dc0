"""Triton kernels (hstu.ops.triton). Importing a module of this subpackage imports triton; nothing else in
hstu.ops does — the dispatchers import these modules lazily, only when backend == TRITON."""
