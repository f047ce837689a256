"""Thin modules over svq_fast.kernels with torch-compatible state_dicts."""
