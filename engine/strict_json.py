"""Reports as strict JSON: a figure with no value (a TTFT percentile when nothing completed,
an infinite time) is written as null. Python's json writes NaN and Infinity, which jq,
JavaScript and most other readers refuse."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite_or_none(obj: Any) -> Any:
    """`obj` with every non-finite float, however deeply nested, replaced by None (numpy
    scalars and arrays as the Python numbers and lists they hold)."""
    if isinstance(obj, np.ndarray | np.generic):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_strict(obj: Any, indent: int | None = None) -> str:
    """json.dumps that never writes NaN or Infinity (other objects by their str, as paths)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False, default=str)
