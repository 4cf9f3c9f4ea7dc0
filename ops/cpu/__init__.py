"""C++ CPU kernels (``Backend.CPU``), built on first use with torch.utils.cpp_extension (see build.py)."""
