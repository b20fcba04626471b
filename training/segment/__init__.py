"""Semantic-segmentation fine-tuning and evaluation (spec §4, §7.4, §8, §9)."""
