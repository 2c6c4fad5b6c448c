"""Evaluation: plain-array metrics (embeddings and labels in, numbers out) and embedding extraction."""

from carl_scale.eval.embed import VideoEmbeddings, extract_embeddings
from carl_scale.eval.metrics import kendalls_tau, phase_classification

__all__ = ["VideoEmbeddings", "extract_embeddings", "kendalls_tau", "phase_classification"]
