"""Rendering pre-training (PonderIndoor-v2): dataset, task, config, evaluation and CLI."""
