"""Imported once by the forkserver that forks local worker processes (sweep/local.py): torch, the
engine and every registered method and dataset, so each run's fresh process starts with them
already imported instead of paying seconds of imports per run. Nothing here touches CUDA."""
from mmbench.data.base import DATASETS
from mmbench.engine import run as _run  # noqa: F401  (torch, trainer, store)
from mmbench.methods.base import METHODS
from mmbench.sweep import worker as _worker  # noqa: F401

METHODS.names()  # import every method module now: registries fill on first use
DATASETS.names()
