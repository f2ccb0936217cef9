"""A re-sampled view of a stored train split (methods that re-sample their training data, e.g. modality
valuation): entry j is stored item `indices[j]` plus its integer `tag`. Reads stay batched: a batch of
entries is one `__getitems__` call on the underlying split."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from mmbench.methods.base import TrainPlan


class PlannedSplit(Dataset):
    def __init__(self, base: Any, plan: TrainPlan) -> None:
        if len(plan.indices) != len(plan.tags):
            raise ValueError(f"train plan: {len(plan.indices)} indices but {len(plan.tags)} tags")
        n = len(base)
        bad = [i for i in plan.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"train plan: indices {bad[:5]} outside the train split of {n} items")
        self.base = base
        self.indices = np.asarray(plan.indices, dtype=np.int64)
        self.tags = np.asarray(plan.tags, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        out = dict(self.base[int(self.indices[j])])
        out["tag"] = self.tags[j]
        return out

    def __getitems__(self, js: list[int]) -> dict[str, Any]:
        js_arr = np.asarray(js, dtype=np.int64)
        out = dict(self.base.__getitems__(self.indices[js_arr].tolist()))
        out["tag"] = self.tags[js_arr]
        return out
