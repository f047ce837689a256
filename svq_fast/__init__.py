"""svq_fast: training stack for semantic image synthesis with semantically coupled VQ models."""

__version__ = "0.1.0"
