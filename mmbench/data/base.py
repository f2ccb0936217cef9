"""Dataset interface: each dataset module registers one `DatasetBuilder` subclass."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmbench.registry import Registry


@dataclass
class PrepareRequest:
    data_dir: Path
    protocol: str
    source: Path | None = None
    workers: int = 1
    force: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    used: dict[str, str] = field(default_factory=dict)  # local files read, name -> path (for the report)


@dataclass
class PrepareResult:
    store: Path
    skipped: bool  # True when an up-to-date store already existed and nothing was done
    report: dict[str, Any]


class DatasetBuilder(ABC):
    """Turns a raw dataset into a prepared store (mmbench.data.store) for one protocol.

    Subclasses set `name`, `description`, `protocols` (name -> one-line description) and
    `default_protocol`, and implement `prepare`.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    protocols: ClassVar[dict[str, str]] = {}
    default_protocol: ClassVar[str] = "default"
    modalities: ClassVar[tuple[str, ...]] = ("audio", "visual")

    @classmethod
    def modalities_of(cls, protocol: str) -> tuple[str, ...]:
        """The modalities a protocol gives before it is prepared (a protocol may add one)."""
        return cls.modalities

    @abstractmethod
    def prepare(self, req: PrepareRequest) -> PrepareResult:
        """Build (or find up to date) the store of `req.protocol`; idempotent and resumable."""


DATASETS: Registry[type[DatasetBuilder]] = Registry("dataset", "mmbench.data.datasets")


def register_dataset(cls: type[DatasetBuilder]) -> type[DatasetBuilder]:
    return DATASETS.register(cls.name)(cls)
