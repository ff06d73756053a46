"""Evaluation of synthetic datasets: knowledge distillation, pruning, from-scratch
training and fidelity metrics, streaming the shards. Depends on ``pipeline``."""
