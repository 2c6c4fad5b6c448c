"""Pretraining with DeepSpeed: configs, trainer, checkpoints, logging."""
