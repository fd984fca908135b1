"""A serving request and its life cycle.

A request is WAITING (in the queue), RUNNING (holding a KV-cache slot), DONE, or
REJECTED (with a reason). Those four states partition every arrival, which is the
engine's "nothing is lost" invariant: arrived = completed + queued + running + rejected.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class RequestState(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    DONE = 2
    REJECTED = 3


@dataclass(slots=True, eq=False)
class Request:
    """One inference request: a prompt to prefill and `output_len` tokens to generate.

    Times are seconds on the engine's clock. `generated` counts tokens produced so far;
    the first one comes out of the prefill, each later one out of a decode step.
    """

    rid: int
    arrival_s: float
    prompt_len: int
    output_len: int
    state: RequestState = RequestState.WAITING
    generated: int = 0
    first_token_s: float = math.nan
    finish_s: float = math.nan
    tries: int = 0
    reject_reason: str = ""
    # Scheduler bookkeeping: the iteration whose decode step emits the last token.
    finish_iter: int = -1

    @property
    def context_len(self) -> int:
        """Tokens the KV cache holds for this request (prompt plus generated)."""
        return self.prompt_len + self.generated

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for single-token outputs)."""
        if self.output_len <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.output_len - 1)

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    def meets_slo(self, ttft_s: float, tpot_s: float) -> bool:
        """DistServe's goodput criterion: both TTFT and TPOT within their targets."""
        return self.state == RequestState.DONE and self.ttft_s <= ttft_s and self.tpot_s <= tpot_s
