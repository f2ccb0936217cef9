"""One module per dataset; each registers a DatasetBuilder (see mmbench.data.base)."""
