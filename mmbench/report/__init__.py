"""Reports: aggregation of the results database into comparison tables and plots."""
