"""Ablation harness for the transformer designs behind video generation."""
__version__ = "0.1.0"
