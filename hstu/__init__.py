"""HSTU generative-recommender trainer. Sub-packages: trainer, modules, ops, launch (mapped from top-level folders)."""

__version__ = "0.1.0"
