"""Sweeps: recipe -> planned runs (with dependencies) -> launched runs."""
