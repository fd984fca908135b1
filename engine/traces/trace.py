"""`Trace`, the column form of a workload, and `TraceError`, what every loader raises.

A Trace holds arrival times and prompt and output lengths as numpy columns, so that
scaling, windowing and clipping are array operations; `to_requests` turns it into the
engine's `Request` objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..request import Request

# The largest token count a trace may hold: far past any context, and far from int64's
# limit, where a cast of a bigger float would wrap around.
MAX_TOKENS = 2**31 - 1


class TraceError(InputError):
    """A trace file or spec that cannot be used; the message names the file, line and fault."""


def _where(path: str | Path, line: int | None) -> str:
    return f"{path}: line {line}" if line is not None else f"{path}"


def trace_error(path: str | Path, line: int | None, fault: str) -> TraceError:
    """The error for a fault at a file's 1-based line (None: the whole file)."""
    return TraceError(f"{_where(path, line)}: {fault}")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Trace:
    """A workload: one row per request, arrivals in seconds starting at 0.

    Arrays are copied, coerced (float64 / int64) and made read-only, so a Trace can be
    shared between simulations without one run mutating another's workload.
    """

    name: str
    arrival_s: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    source: str
    clipped_prompts: int = 0
    clipped_outputs: int = 0

    def __post_init__(self) -> None:
        arr = np.array(self.arrival_s, dtype=np.float64, copy=True).reshape(-1)
        pl = np.array(self.prompt_len, dtype=np.int64, copy=True).reshape(-1)
        ol = np.array(self.output_len, dtype=np.int64, copy=True).reshape(-1)
        if not (len(arr) == len(pl) == len(ol)):
            raise ValueError(f"trace {self.name!r}: column lengths differ ({len(arr)}, {len(pl)}, {len(ol)})")
        if len(arr):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"trace {self.name!r}: arrival times must be finite")
            if np.any(np.diff(arr) < 0):
                raise ValueError(f"trace {self.name!r}: arrival times must be non-decreasing")
            arr = arr - arr[0]
            if pl.min() < 1 or ol.min() < 1:
                raise ValueError(f"trace {self.name!r}: prompt and output lengths must be >= 1")
        object.__setattr__(self, "arrival_s", _frozen(arr))
        object.__setattr__(self, "prompt_len", _frozen(pl))
        object.__setattr__(self, "output_len", _frozen(ol))

    def __len__(self) -> int:
        return len(self.arrival_s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        return (
            (self.name, self.source, self.clipped_prompts, self.clipped_outputs)
            == (other.name, other.source, other.clipped_prompts, other.clipped_outputs)
            and np.array_equal(self.arrival_s, other.arrival_s)
            and np.array_equal(self.prompt_len, other.prompt_len)
            and np.array_equal(self.output_len, other.output_len)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays; equality is by value

    def __repr__(self) -> str:
        return (
            f"Trace(name={self.name!r}, requests={len(self)}, duration_s={self.duration_s:.1f}, "
            f"mean_rate={self.mean_rate:.2f}, source={self.source!r})"
        )

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last arrival (0 for fewer than two requests)."""
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the trace's span; inf if all arrive at once, 0 if empty."""
        if not len(self):
            return 0.0
        d = self.duration_s
        return len(self) / d if d > 0 else math.inf

    def _replace(self, **changes: object) -> Trace:
        fields = {
            "name": self.name,
            "arrival_s": self.arrival_s,
            "prompt_len": self.prompt_len,
            "output_len": self.output_len,
            "source": self.source,
            "clipped_prompts": self.clipped_prompts,
            "clipped_outputs": self.clipped_outputs,
        }
        fields.update(changes)
        return Trace(**fields)  # type: ignore[arg-type]

    def scaled(self, speedup: float) -> Trace:
        """Replay `speedup` times faster (arrivals divided by it); lengths unchanged."""
        speedup = float(speedup)
        if not (math.isfinite(speedup) and speedup > 0):
            raise ValueError(f"speedup must be > 0 and finite, got {speedup}")
        return self._replace(name=f"{self.name}@x{speedup:g}", arrival_s=self.arrival_s / speedup)

    def window(self, start_s: float, duration_s: float) -> Trace:
        """Rows with start_s <= t < start_s + duration_s, re-based so the first kept arrival is 0."""
        start_s, duration_s = float(start_s), float(duration_s)
        if not (math.isfinite(start_s) and start_s >= 0):
            raise ValueError(f"window start must be >= 0 and finite, got {start_s}")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"window duration must be > 0 and finite, got {duration_s}")
        lo = int(np.searchsorted(self.arrival_s, start_s, side="left"))
        hi = int(np.searchsorted(self.arrival_s, start_s + duration_s, side="left"))
        return self._replace(
            name=f"{self.name}[{start_s:g}s+{duration_s:g}s]",
            arrival_s=self.arrival_s[lo:hi],
            prompt_len=self.prompt_len[lo:hi],
            output_len=self.output_len[lo:hi],
        )

    def clip(self, max_context: int) -> Trace:
        """Fit every request into `max_context` tokens: prompt <= max_context-1, prompt+output <= max_context.

        Counts the rows whose prompt (resp. output) was cut, added to the existing counters.
        """
        max_context = int(max_context)
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2 (one prompt and one output token), got {max_context}")
        prompt = np.minimum(self.prompt_len, max_context - 1)
        output = np.minimum(self.output_len, max_context - prompt)
        return self._replace(
            prompt_len=prompt,
            output_len=output,
            clipped_prompts=self.clipped_prompts + int(np.count_nonzero(prompt != self.prompt_len)),
            clipped_outputs=self.clipped_outputs + int(np.count_nonzero(output != self.output_len)),
        )

    def to_requests(self, start_rid: int = 0) -> list[Request]:
        """Fresh engine requests with ids start_rid, start_rid+1, ... in arrival order."""
        return [
            Request(start_rid + i, a, p, o)
            for i, (a, p, o) in enumerate(
                zip(self.arrival_s.tolist(), self.prompt_len.tolist(), self.output_len.tolist(), strict=True)
            )
        ]
