"""Training: DeepSpeed engine construction, the stage loops, checkpoints and exports, logging."""
