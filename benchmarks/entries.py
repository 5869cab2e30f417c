"""One layer of a featx cache entry as the probe sees it: float32 rows, labels and the protocol's splits."""

from __future__ import annotations

import json

import numpy as np


def entry_layer(entry_path: str, layer: str | None = None, seed: int = 0):
    """(X, y, splits, layer) over the entry's readable samples; the last layer unless one is named."""
    import h5py

    from featx.probing.protocol import assign_splits

    with h5py.File(entry_path, "r") as f:
        ok = f["samples/ok"][()].astype(bool)
        y = f["samples/label"][()][ok]
        splits = assign_splits(y, f["samples/split"].asstr()[()][ok], seed)
        layer = layer or json.loads(f["layers"].attrs["order"])[-1]
        X = f["layers"][layer][()][ok].astype(np.float32)
    return X, y, splits, layer
