"""Training engine: the loop, evaluation, selection, checkpoints; one run end to end."""
