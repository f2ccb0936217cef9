"""Metrics: classification, imbalance, competition strength, probes."""
