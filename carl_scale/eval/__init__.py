"""Evaluation: plain-array metrics (embeddings and labels in, numbers out) and embedding extraction."""

from carl_scale.eval.embed import VideoEmbeddings, extract_embeddings
from carl_scale.eval.metrics import (average_precision_at_k, kendalls_tau, linear_probe_frame_classification,
                                     one_shot_phase_classification, phase_classification, phase_progression,
                                     temporal_clustering_rand_index)

__all__ = ["VideoEmbeddings", "extract_embeddings", "kendalls_tau", "phase_classification", "phase_progression",
           "average_precision_at_k", "one_shot_phase_classification", "temporal_clustering_rand_index",
           "linear_probe_frame_classification"]
