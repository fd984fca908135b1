"""The scheduler's admission limits, completion and OOM accounting, with no executor."""

from __future__ import annotations

from autoopt.engine.executor import Capacity, StepResult
from autoopt.engine.knobs import Knobs
from autoopt.engine.request import Request, RequestState
from autoopt.engine.scheduler import Scheduler


def _reqs(n: int, prompt: int = 10, output: int = 3) -> list[Request]:
    return [Request(rid=i, arrival_s=0.0, prompt_len=prompt, output_len=output) for i in range(n)]


def _sched(slots: int = 64, ctx: int = 512, tries: int = 3) -> Scheduler:
    return Scheduler(Capacity(max_slots=slots, max_context=ctx), max_tries=tries)


def test_admission_respects_max_num_seqs():
    s = _sched()
    for r in _reqs(10):
        s.add(r)
    batch = s.schedule(Knobs(max_num_seqs=4, max_batched_tokens=10_000))
    assert len(batch.prefill) == 4 and not batch.decode
    s.complete(batch, 0.1, StepResult(ms=1.0))
    # The 4 running count against the limit: no new admission.
    batch = s.schedule(Knobs(max_num_seqs=4, max_batched_tokens=10_000))
    assert len(batch.prefill) == 0 and len(batch.decode) == 4


def test_admission_respects_token_budget_including_decode_tokens():
    s = _sched()
    for r in _reqs(10, prompt=100):
        s.add(r)
    batch = s.schedule(Knobs(max_num_seqs=64, max_batched_tokens=1024))
    assert len(batch.prefill) == 10 and batch.prefill_tokens == 1000
    s.complete(batch, 0.1, StepResult(ms=1.0))
    s.add(Request(rid=99, arrival_s=0.1, prompt_len=1015, output_len=3))
    # 10 decode tokens + 1015 > 1024: the newcomer waits while the others decode.
    batch = s.schedule(Knobs(max_num_seqs=64, max_batched_tokens=1024))
    assert not batch.prefill and len(batch.decode) == 10 and batch.num_tokens == 10


def test_token_budget_counts_prefill_tokens():
    s = _sched()
    for r in _reqs(10, prompt=300):
        s.add(r)
    batch = s.schedule(Knobs(max_num_seqs=64, max_batched_tokens=1024))
    assert [r.rid for r in batch.prefill] == [0, 1, 2]
    assert batch.prefill_tokens == 900
    s.complete(batch, 0.1, StepResult(ms=1.0))
    # Next iteration: 3 decode tokens + 300-token prompts: 3 + 3*300 = 903 <= 1024.
    batch = s.schedule(Knobs(max_num_seqs=64, max_batched_tokens=1024))
    assert len(batch.prefill) == 3 and len(batch.decode) == 3


def test_oversized_prompt_runs_alone_instead_of_starving():
    s = _sched()
    s.add(Request(rid=0, arrival_s=0.0, prompt_len=400, output_len=2))
    s.add(Request(rid=1, arrival_s=0.0, prompt_len=10, output_len=2))
    batch = s.schedule(Knobs(max_num_seqs=8, max_batched_tokens=1024).replace(max_batched_tokens=100))
    assert [r.rid for r in batch.prefill] == [0]


def test_kv_slots_cap_the_batch():
    s = _sched(slots=2)
    for r in _reqs(5):
        s.add(r)
    assert len(s.schedule(Knobs(max_num_seqs=64)).prefill) == 2


def test_requests_finish_after_output_len_tokens_and_balance():
    s = _sched()
    reqs = [Request(rid=i, arrival_s=0.0, prompt_len=5, output_len=i + 1) for i in range(4)]
    for r in reqs:
        s.add(r)
    knobs = Knobs(max_num_seqs=8)
    t = 0.0
    finished_at: dict[int, int] = {}
    for it in range(1, 10):
        batch = s.schedule(knobs)
        t += 0.01
        for r in s.complete(batch, t, StepResult(ms=10.0)):
            finished_at[r.rid] = it
        assert s.balanced()
    # output_len=1 finishes at its prefill; each further token takes one decode iteration.
    assert finished_at == {0: 1, 1: 2, 2: 3, 3: 4}
    assert all(r.state == RequestState.DONE and r.generated == r.output_len for r in reqs)
    assert s.running_context_tokens == 0


def test_too_long_request_is_rejected_with_reason():
    s = _sched(ctx=64)
    r = Request(rid=0, arrival_s=0.0, prompt_len=60, output_len=10)
    s.add(r)
    assert r.state == RequestState.REJECTED and "context" in r.reject_reason
    assert s.rejected == 1 and s.balanced()


def test_prefill_oom_requeues_at_head_then_rejects_after_max_tries():
    s = _sched(tries=2)
    for r in _reqs(3):
        s.add(r)
    knobs = Knobs(max_num_seqs=2)
    batch = s.schedule(knobs)
    left = s.complete(batch, 0.1, StepResult(ms=1.0, oom=True))
    assert [r.rid for r in left] == [1, 0] or sorted(r.rid for r in left) == [0, 1]
    assert [r.rid for r in s.waiting] == [0, 1, 2]  # back at the head, in order
    assert s.oom_backoff == 1 / 64 and s.balanced()  # half of 20 tokens is below the floor of 1/slots
    assert s.limits(knobs) == (1, 64)  # the batch shrank
    batch = s.schedule(knobs)
    s.complete(batch, 0.2, StepResult(ms=1.0, oom=True))
    rejected = [r for r in batch.prefill if r.state == RequestState.REJECTED]
    assert rejected and all("out of memory" in r.reject_reason for r in rejected)
    assert s.balanced()


def test_prefill_oom_halves_the_failed_batch_not_just_the_limit():
    """A batch that used a fraction of a large token budget would fit under half the budget
    again and run out of memory the same way: the retry gets at most half its tokens."""
    s = _sched(slots=256)
    for r in _reqs(20, prompt=100):
        s.add(r)
    knobs = Knobs(max_num_seqs=256, max_batched_tokens=32768)
    s.complete(s.schedule(knobs), 0.1, StepResult(ms=1.0))  # 20 running
    for r in _reqs(40, prompt=200):
        s.add(Request(rid=100 + r.rid, arrival_s=0.1, prompt_len=200, output_len=3))
    batch = s.schedule(knobs)
    used = batch.prefill_tokens + len(batch.decode)
    assert used == 40 * 200 + 20  # well under half the budget
    s.complete(batch, 0.2, StepResult(ms=1.0, oom=True))
    assert s.limits(knobs)[1] <= used // 2
    retry = s.schedule(knobs)
    assert 0 < retry.prefill_tokens + len(retry.decode) <= used // 2
    s.complete(retry, 0.3, StepResult(ms=1.0))
    # and the limits recover as clean iterations follow
    for _ in range(70):
        s.complete(s.schedule(knobs), 1.0, StepResult(ms=1.0))
    assert s.oom_backoff == 1.0 and s.balanced()


def test_decode_oom_preempts_newest_half_and_recomputes():
    s = _sched()
    reqs = _reqs(4, output=10)
    for r in reqs:
        s.add(r)
    knobs = Knobs(max_num_seqs=4)
    s.complete(s.schedule(knobs), 0.1, StepResult(ms=1.0))
    batch = s.schedule(knobs)
    assert not batch.prefill and len(batch.decode) == 4
    left = s.complete(batch, 0.2, StepResult(ms=1.0, oom=True))
    assert sorted(r.rid for r in left) == [2, 3]
    assert [r.rid for r in s.running] == [0, 1]
    assert [r.rid for r in s.waiting] == [2, 3]
    # A preempted request re-prefills its prompt plus the token it already generated.
    assert s.waiting[0].context_len == 11 and s.queued_tokens == 22
    assert s.balanced()
    # They finish later with the right token count.
    for _ in range(30):
        s.complete(s.schedule(knobs), 1.0, StepResult(ms=1.0))
    assert s.completed == 4 and all(r.generated == 10 and r.state == RequestState.DONE for r in reqs)


def test_kv_budget_holds_back_admission_and_rejects_what_can_never_fit():
    s = Scheduler(Capacity(max_slots=64, max_context=512, max_kv_tokens=60))
    reqs = [Request(rid=i, arrival_s=0.0, prompt_len=20, output_len=5) for i in range(4)]
    too_big = Request(rid=9, arrival_s=0.0, prompt_len=60, output_len=5)
    for r in [*reqs, too_big]:
        s.add(r)
    assert too_big.state == RequestState.REJECTED and "KV tokens" in too_big.reject_reason
    knobs = Knobs(max_num_seqs=64)
    batch = s.schedule(knobs)
    assert len(batch.prefill) == 2 and s.reserved_kv_tokens == 0  # 2 x 25 <= 60 < 3 x 25
    s.complete(batch, 0.1, StepResult(ms=1.0))
    assert s.reserved_kv_tokens == 50
    for _ in range(20):
        s.complete(s.schedule(knobs), 1.0, StepResult(ms=1.0))
        assert s.reserved_kv_tokens <= 60 and s.balanced()
    assert s.completed == 4 and s.reserved_kv_tokens == 0


def test_shrinking_kv_budget_rejects_queued_requests_that_no_longer_fit():
    s = Scheduler(Capacity(max_slots=64, max_context=512, max_kv_tokens=100))
    small, big = Request(0, 0.0, 20, 5), Request(1, 0.0, 70, 5)
    s.add(small)
    s.add(big)
    s.set_capacity(Capacity(max_slots=64, max_context=512, max_kv_tokens=50))  # e.g. bf16 -> fp32
    assert big.state == RequestState.REJECTED and small.state == RequestState.WAITING
    assert big.reject_reason == "needs 75 KV tokens, the memory holds 50"
    assert s.queued_tokens == 20 and s.balanced()
    s.set_capacity(Capacity(max_slots=64, max_context=20, max_kv_tokens=1000))  # the reason is the context
    assert small.state == RequestState.REJECTED
    assert small.reject_reason == "needs 25 tokens of context, the model holds 20"


def test_queue_timeout_rejects_only_requests_that_waited_too_long():
    s = Scheduler(Capacity(max_slots=64, max_context=512), queue_timeout_s=2.0)
    old, new = Request(0, 0.0, 10, 3), Request(1, 1.5, 10, 3)
    s.add(old)
    s.add(new)
    assert s.expire(now_s=1.9) == 0
    assert s.expire(now_s=2.5) == 1
    assert old.state == RequestState.REJECTED and "queue" in old.reject_reason
    assert [r.rid for r in s.waiting] == [1] and s.queued_tokens == 10 and s.balanced()
