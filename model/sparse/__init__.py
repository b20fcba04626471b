"""Sparse-convolution building blocks: spconv layer factories, kernel maps and gather-based ops."""
