"""Data: prepared store, datasets, decoding, features, transforms."""
