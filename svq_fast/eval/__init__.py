"""Evaluation: sampling from semantic maps, metrics."""
