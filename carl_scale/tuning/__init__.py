"""Hyper-parameter sweeps with Ray Tune (``python tuning/sweep.py``): a caller of training and
evaluation, like the entry points."""
