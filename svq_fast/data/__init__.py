"""Data path: label spaces, shard writing, synthetic scenes, streaming loader, joint transforms."""
