"""Iteration-level continuous batching (Orca, vLLM), independent of how batches run.

Each iteration the scheduler admits waiting requests, first come first served, for
prefill within `max_num_seqs` (sequences in the batch, running ones included),
`max_batched_tokens` (prefill tokens plus one per decoding sequence) and the KV budget
(each admitted request reserves its whole prompt plus output, so a running request never
runs out of KV space), and runs one decode step for every running request. The torch engine and the simulator call it
unchanged; only their executors differ.

Out of memory: the batch's prefill requests go back to the head of the queue (a decode
OOM preempts the newest half of the running set the same way, recompute-style), each
try is counted, a request that fails `max_tries` times is rejected with the reason, and
the limits shrink to at most half of what the failed batch used (half the limit when it
used all of it), then recover additively (AIMD on the OOM signal).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from .executor import Batch, Capacity, StepResult
from .knobs import Knobs
from .request import Request, RequestState

OOM_BACKOFF_RECOVERY = 1.0 / 64  # limits regain full size ~64 clean iterations after an OOM


def _never_fits(request: Request, capacity: Capacity) -> str:
    """Why `request` (prompt + output) can never run under `capacity`, or "" if it can."""
    total = request.prompt_len + request.output_len
    if total > capacity.max_context:
        return f"needs {total} tokens of context, the model holds {capacity.max_context}"
    if total > capacity.max_kv_tokens:
        return f"needs {total} KV tokens, the memory holds {capacity.max_kv_tokens}"
    return ""


class Scheduler:
    """Owns the queue and the running set; every arrival ends in exactly one state."""

    def __init__(self, capacity: Capacity, max_tries: int = 3, queue_timeout_s: float | None = None) -> None:
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.capacity = capacity
        self.max_tries = max_tries
        self.queue_timeout_s = queue_timeout_s
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.iteration = 0
        self.arrived = 0
        self.completed = 0
        self.rejected = 0
        self.queued_tokens = 0
        self.running_context_tokens = 0
        self.reserved_kv_tokens = 0  # prompt + output of every running request
        self.oom_backoff = 1.0
        self._tokens_in_force = 0  # the token budget of the last batch scheduled
        self._finish_heap: list[tuple[int, int, Request]] = []

    # -- arrivals ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue an arrival, or reject it at once when no KV slot could ever hold it."""
        self.arrived += 1
        why = _never_fits(request, self.capacity)
        if why:
            self._reject(request, why)
            return
        request.state = RequestState.WAITING
        self.waiting.append(request)
        self.queued_tokens += request.context_len

    def set_capacity(self, capacity: Capacity) -> None:
        """Follow the executor's limits when they move (a precision change resizes the KV
        budget). Queued requests that can no longer ever fit are rejected with the reason."""
        self.capacity = capacity
        keep: deque[Request] = deque()
        for r in self.waiting:
            why = _never_fits(r, capacity)
            if why:
                self.queued_tokens -= r.context_len
                self._reject(r, why)
            else:
                keep.append(r)
        self.waiting = keep

    # -- one iteration ----------------------------------------------------------------
    def limits(self, knobs: Knobs) -> tuple[int, int]:
        """The batch limits in force: the knobs, capped by KV slots, shrunk after OOMs."""
        seqs = min(knobs.max_num_seqs, self.capacity.max_slots)
        if self.oom_backoff == 1.0:  # the common case (Knobs validates max_batched_tokens >= 1)
            return max(1, seqs), knobs.max_batched_tokens
        seqs = max(1, int(seqs * self.oom_backoff))
        tokens = max(1, int(knobs.max_batched_tokens * self.oom_backoff))
        return seqs, tokens

    def expire(self, now_s: float) -> int:
        """Reject requests that waited longer than `queue_timeout_s` (a client's deadline:
        they would miss their SLO anyway, and shedding them keeps overload recoverable).
        The queue is first come first served, so the expired ones are at its head."""
        if self.queue_timeout_s is None:
            return 0
        waiting, deadline, n = self.waiting, now_s - self.queue_timeout_s, 0
        while waiting and waiting[0].arrival_s < deadline and waiting[0].generated == 0:
            r = waiting.popleft()
            self.queued_tokens -= r.context_len
            self._reject(r, f"waited over {self.queue_timeout_s:g} s in the queue")
            n += 1
        return n

    def schedule(self, knobs: Knobs) -> Batch:
        max_seqs, max_tokens = self.limits(knobs)
        self._tokens_in_force = max_tokens
        n = len(self.running)
        tokens = n
        prefill: list[Request] = []
        prefill_tokens = 0
        waiting = self.waiting
        kv_free = self.capacity.max_kv_tokens - self.reserved_kv_tokens
        while waiting and n < max_seqs:
            head = waiting[0]
            need = head.context_len
            # A prompt bigger than the whole budget runs alone rather than starving.
            if tokens + need > max_tokens and (n > 0 or prefill):
                break
            reserve = head.prompt_len + head.output_len
            if reserve > kv_free:
                break
            kv_free -= reserve
            r = waiting.popleft()
            prefill.append(r)
            prefill_tokens += need
            tokens += need
            n += 1
        self.queued_tokens -= prefill_tokens
        return Batch(prefill, self.running, prefill_tokens, self.running_context_tokens)

    def complete(self, batch: Batch, now_s: float, result: StepResult) -> list[Request]:
        """Account one executed batch; returns the requests that left the running set.

        Those are finished requests (DONE) and, after an OOM, preempted or rejected ones:
        the caller hands them to the executor's `release`.
        """
        if result.oom:
            return self._on_oom(batch)
        self.iteration += 1
        it = self.iteration
        # One decode token for each request that was already running.
        for r in batch.decode:
            r.generated += 1
        self.running_context_tokens += len(batch.decode)
        for r in batch.prefill:
            r.state = RequestState.RUNNING
            r.generated += 1
            if math.isnan(r.first_token_s):
                r.first_token_s = now_s
            self.running_context_tokens += r.context_len
            self.reserved_kv_tokens += r.prompt_len + r.output_len
            r.finish_iter = it + (r.output_len - r.generated)
            heapq.heappush(self._finish_heap, (r.finish_iter, r.rid, r))
            self.running.append(r)
        self.oom_backoff = min(1.0, self.oom_backoff + OOM_BACKOFF_RECOVERY)
        return self._pop_finished(it, now_s)

    # -- internals --------------------------------------------------------------------
    def _pop_finished(self, it: int, now_s: float) -> list[Request]:
        heap = self._finish_heap
        if not heap or heap[0][0] > it:
            return []
        done: list[Request] = []
        while heap and heap[0][0] <= it:
            _, _, r = heapq.heappop(heap)
            if r.state != RequestState.RUNNING or r.finish_iter > it:
                continue  # a stale entry of a request that was preempted
            r.state = RequestState.DONE
            r.finish_s = now_s
            self.running_context_tokens -= r.context_len
            self.reserved_kv_tokens -= r.prompt_len + r.output_len
            self.completed += 1
            done.append(r)
        if done:  # a new list (a batch still holds the old one), without the finished
            running = self.running.copy()
            for r in done:
                running.remove(r)
            self.running = running
        return done

    def _on_oom(self, batch: Batch) -> list[Request]:
        # Halve the token budget below what the failed batch used, not merely below the
        # limit: a batch that used a fifth of a large budget would fit under half of it
        # again, and its retry would run out of memory the same way.
        shrink = 0.5
        if batch.prefill:
            used = batch.prefill_tokens + len(batch.decode)
            shrink *= min(1.0, used / max(1, self._tokens_in_force or used))
        self.oom_backoff = max(self.oom_backoff * shrink, 1.0 / max(1, self.capacity.max_slots))
        if batch.prefill:
            victims = list(batch.prefill)
        else:
            k = max(1, len(self.running) // 2)
            victims = self.running[-k:]
            self.running = self.running[:-k]
            for r in victims:
                self.running_context_tokens -= r.context_len
                self.reserved_kv_tokens -= r.prompt_len + r.output_len
                r.finish_iter = -1
        left: list[Request] = []
        for r in reversed(victims):  # reversed + appendleft keeps their order at the head
            r.tries += 1
            left.append(r)
            if r.tries >= self.max_tries:
                self._reject(r, f"out of memory on {r.tries} tries")
            else:
                r.state = RequestState.WAITING
                self.waiting.appendleft(r)
                self.queued_tokens += r.context_len
        return left

    def _reject(self, request: Request, reason: str) -> None:
        request.state = RequestState.REJECTED
        request.reject_reason = reason
        self.rejected += 1

    # -- accounting -------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def balanced(self) -> bool:
        """The no-loss invariant: every arrival is in exactly one of the four states."""
        return self.arrived == self.completed + self.queued + self.num_running + self.rejected
