"""lowmem: full-parameter training of billion-parameter language models on one consumer GPU."""

__version__ = "0.1.0"
