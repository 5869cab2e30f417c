"""Golden features: the numbers of a fixed computation, stored per cache FORMAT_VERSION.

Entries in the cache are reused whenever their key matches, and the key holds no hash of
featx's own pooling or preprocessing code: only ``FORMAT_VERSION`` (featx/cache/key.py) says
that features computed the same way may be reused. This test fails when the features of a
small deterministic run through the real extract path (bundled EfficientNet-Lite0 weights,
synthetic images, three layers) change while ``FORMAT_VERSION`` stays the same.

When you change pooling, preprocessing or layer taps on purpose: bump ``FORMAT_VERSION`` and
record the new numbers with

    python tests/test_golden_features.py --regenerate      (or FEATX_REGENERATE_GOLDEN=1 pytest ...)

The tolerance (rtol 1e-3) absorbs float noise between CPUs and BLAS builds, not real changes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_features.json"
LAYERS = ("blocks.1", "blocks.3", "pre_logits")
RTOL = 1e-3
REGENERATE = "python tests/test_golden_features.py --regenerate"


def _images(root: Path) -> Path:
    """Four deterministic images of two sizes (so resize and crop both do work), two classes."""
    rng = np.random.default_rng(20240601)
    for i, (w, h) in enumerate([(80, 72), (72, 96), (80, 72), (72, 96)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (3 + i)) % 256, (yy * (5 + i)) % 256, ((xx + yy) * (2 + i)) % 256], axis=-1)
        noise = rng.integers(0, 40, size=(h, w, 3))
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(d / f"img{i}.png")
    return root


def compute() -> dict:
    """Summary of the features the real extract path gives today."""
    import featx

    with tempfile.TemporaryDirectory() as tmp:
        root = _images(Path(tmp) / "images")
        entry = featx.extract(f"folder:{root}", model="efficientnet_lite0", layers=",".join(LAYERS), pool="avg",
                              image_size=64, dtype="float32", device="cpu", workers=0, progress=False,
                              cache_dir=Path(tmp) / "cache")
        out = {}
        for name in LAYERS:
            X = entry.load(name).X.astype(np.float64)
            out[name] = {
                "shape": list(X.shape),
                "row_norms": [float(v) for v in np.linalg.norm(X, axis=1)],
                "mean": float(X.mean()),
                "abs_mean": float(np.abs(X).mean()),
                "first": [float(v) for v in X[0, :6]],
            }
        return out


def _rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.7g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def differences(expected: dict, actual: dict) -> list[str]:
    """Human-readable list of what differs beyond the tolerance."""
    found = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or got["shape"] != want["shape"]:
            found.append(f"{name}: shape {None if got is None else got['shape']} != {want['shape']}")
            continue
        atol = RTOL * want["abs_mean"]
        for field in ("row_norms", "mean", "abs_mean", "first"):
            a, b = np.asarray(got[field]), np.asarray(want[field])
            if not np.allclose(a, b, rtol=RTOL, atol=atol):
                found.append(f"{name}.{field}: got {np.round(a, 6).tolist()}, expected {b.tolist()}")
    return found


def _stored() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def regenerate() -> None:
    from featx.cache.key import FORMAT_VERSION

    stored = _stored()
    stored[str(FORMAT_VERSION)] = _rounded(compute())
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    print(f"wrote golden features for FORMAT_VERSION {FORMAT_VERSION} to {GOLDEN}")


@pytest.mark.slow
def test_features_match_the_golden_values_of_this_format_version():
    import pytest

    from featx.cache.key import FORMAT_VERSION

    if os.environ.get("FEATX_REGENERATE_GOLDEN") == "1":
        regenerate()
    expected = _stored().get(str(FORMAT_VERSION))
    if expected is None:
        pytest.fail(f"{GOLDEN} has no golden features for FORMAT_VERSION {FORMAT_VERSION}. If you bumped it on "
                    f"purpose, record the new features with `{REGENERATE}` (or FEATX_REGENERATE_GOLDEN=1) "
                    "and commit the file.")
    found = differences(expected, compute())
    assert not found, (
        "features changed without a FORMAT_VERSION bump: cache entries computed before this change would be "
        f"reused as if they were equal. Bump FORMAT_VERSION in featx/cache/key.py and run `{REGENERATE}`.\n  "
        + "\n  ".join(found)
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: {REGENERATE}")
    regenerate()
