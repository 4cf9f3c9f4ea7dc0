"""PyTorch reference implementations of the ops (CPU-friendly, autograd)."""
