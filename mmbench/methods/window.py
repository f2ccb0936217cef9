"""The modulation window BalanceBenchmark's trainers share: a method acts on epochs
`modulation_starts..modulation_ends` (0-based, inclusive) and trains plainly outside it."""
from __future__ import annotations

from pydantic import model_validator

from mmbench.methods.base import Field, HParams

ALWAYS = 10_000  # "every epoch": the official repos have no window


class WindowHParams(HParams):
    modulation_starts: int = Field(0, ge=0, description="first epoch the method acts on (0-based, inclusive)")
    modulation_ends: int = Field(ALWAYS, ge=0, description="last epoch the method acts on (0-based, inclusive); "
                                 "outside the window the step is plain joint training")

    @model_validator(mode="after")
    def _window(self) -> "WindowHParams":
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(
                f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self

    def active(self, epoch: int) -> bool:
        return self.modulation_starts <= epoch <= self.modulation_ends
