"""The batching scheduler in-process, on a fake engine that records every forward.

The fake forward returns, for each input, the row ``[tag, num_tokens, 0, ...]`` (``tag`` is the
input's first token id, unique per input in these tests), so a test can check that every row lands
in its request at its index. A gate lets a test hold the worker inside a forward while it queues
more requests, which makes the batching decisions deterministic.
"""
from __future__ import annotations

import threading

import pytest
import torch

from engine.encoder import plan_batches
from engine.inputs import TokenizedExample
from engine.serve.scheduler import NotAccepting, QueueFull, Scheduler, TooLarge

HIDDEN = 4
TIMEOUT = 30


class FakeEngine:
    def __init__(self, fail_on_tag: int | None = None) -> None:
        self.forwards: list[list[tuple[int, int]]] = []  # per forward: (tag, num_tokens) in batch order
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on_tag = fail_on_tag

    def embed(self, items):
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        batch = [(t.input_ids[0], t.num_tokens) for t in items]
        self.forwards.append(batch)
        if self.fail_on_tag is not None and any(tag == self.fail_on_tag for tag, _ in batch):
            raise RuntimeError("simulated out of memory")
        rows = torch.zeros((len(items), HIDDEN))
        for k, (tag, n) in enumerate(batch):
            rows[k, 0], rows[k, 1] = tag, n
        return rows


class Waiter:
    """on_done callback that records the outcome and lets the test wait for it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.calls = 0

    def __call__(self, error: BaseException | None) -> None:
        self.calls += 1
        self.error = error
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(TIMEOUT), "request never finished"


_tags = iter(range(1, 10**9))


def items(*lengths: int) -> list[TokenizedExample]:
    out = []
    for n in lengths:
        tag = next(_tags)
        out.append(TokenizedExample([tag] + [0] * (n - 1), 0, n))
    return out


def make(fake: FakeEngine, **limits) -> Scheduler:
    limits = {"max_batch_tokens": 64, "max_batch_size": 8, "max_queue_tokens": 10_000, **limits}
    sched = Scheduler(fake.embed, plan_batches, HIDDEN, **limits)
    sched.start()
    assert sched.ready.wait(TIMEOUT)
    return sched


def hold_worker(sched: Scheduler, fake: FakeEngine) -> Waiter:
    """Put the worker inside a forward of one 1-token input and keep it there until the gate opens."""
    fake.gate.clear()
    fake.entered.clear()
    blocker = Waiter()
    sched.submit(items(1), blocker)
    assert fake.entered.wait(TIMEOUT)
    return blocker


def assert_rows(job, batch) -> None:
    """Each row of ``job.out`` is the fake row of the input at that index."""
    for i, t in enumerate(batch):
        assert job.out[i, 0].item() == t.input_ids[0] and job.out[i, 1].item() == t.num_tokens, f"row {i}"


def test_forwards_follow_the_plan_and_respect_both_budgets():
    fake = FakeEngine()
    sched = make(fake, max_batch_tokens=64, max_batch_size=8)
    try:
        blocker = hold_worker(sched, fake)
        requests = [items(5, 30, 12), items(40, 3), items(*[2] * 11), items(64), items(70, 9)]
        waiters = [Waiter() for _ in requests]
        jobs = [sched.submit(r, w) for r, w in zip(requests, waiters)]
        queued_before = sched.stats.queued_tokens
        assert queued_before == sum(t.num_tokens for r in requests for t in r)
        fake.gate.set()
        for w in [blocker, *waiters]:
            w.wait()
        forwards = fake.forwards[1:]
        every_input = sorted(tag for f in forwards for tag, _ in f)
        assert every_input == sorted(t.input_ids[0] for r in requests for t in r), "each input exactly once"
        for f in forwards:
            assert len(f) <= 8
            assert sum(n for _, n in f) <= 64 or len(f) == 1, "over budget only for one over-long input"
            assert [n for _, n in f] == sorted((n for _, n in f), reverse=True), "longest first within a forward"
        # The first forward after the blocker holds the oldest queued input (request 0, input 0).
        assert requests[0][0].input_ids[0] in [tag for tag, _ in forwards[0]]
        for job, r, w in zip(jobs, requests, waiters):
            assert w.error is None and w.calls == 1
            assert_rows(job, r)
        assert sched.stats.queued_tokens == 0 and sched.stats.queued_requests == 0
    finally:
        fake.gate.set()
        sched.stop(TIMEOUT)


def test_forward_takes_the_oldest_inputs_plan_batch():
    """Inputs planned together by plan_batches run together: the oldest input's batch goes first,
    even when a longer input waits behind it."""
    fake = FakeEngine()
    sched = make(fake, max_batch_tokens=20, max_batch_size=8)
    try:
        blocker = hold_worker(sched, fake)
        short = items(4, 4)
        long = items(18)
        w1, w2 = Waiter(), Waiter()
        sched.submit(short, w1)
        sched.submit(long, w2)
        fake.gate.set()
        for w in (blocker, w1, w2):
            w.wait()
        assert fake.forwards[1:] == [[(short[0].input_ids[0], 4), (short[1].input_ids[0], 4)], [(long[0].input_ids[0], 18)]]
    finally:
        fake.gate.set()
        sched.stop(TIMEOUT)


def test_large_request_spans_forwards_and_a_small_one_is_not_kept_waiting_behind_it():
    """Round-robin: the small request that queued behind a large one rides in the next forward with
    the large one's first inputs, and is answered before the large one."""
    fake = FakeEngine()
    sched = make(fake, max_batch_tokens=40, max_batch_size=64)
    try:
        blocker = hold_worker(sched, fake)
        large = items(*[10] * 11)  # 110 tokens: three forwards
        small = items(7)
        wl, ws = Waiter(), Waiter()
        job_l = sched.submit(large, wl)
        job_s = sched.submit(small, ws)
        fake.gate.set()
        for w in (blocker, wl, ws):
            w.wait()
        forwards = fake.forwards[1:]
        assert [sum(n for _, n in f) for f in forwards] == [37, 40, 40]
        assert forwards[0][-1] == (small[0].input_ids[0], 7), "the small request rode in the first forward"
        assert [tag for f in forwards for tag, n in f if n == 10] == [t.input_ids[0] for t in large], "in order"
        assert job_s.finished < job_l.finished
        assert_rows(job_l, large)
        assert_rows(job_s, small)
    finally:
        fake.gate.set()
        sched.stop(TIMEOUT)


def test_round_robin_serves_every_waiting_request_in_the_next_forward():
    """Many single-input requests queued behind a bulk request all ride in the first forward after
    it (the batch has room for one input of each); the bulk request progresses in every forward."""
    fake = FakeEngine()
    sched = make(fake, max_batch_tokens=64, max_batch_size=8)
    try:
        blocker = hold_worker(sched, fake)
        bulk = items(*[3] * 40)
        singles = [items(5) for _ in range(6)]
        waiters = [Waiter() for _ in range(7)]
        sched.submit(bulk, waiters[0])
        for r, w in zip(singles, waiters[1:]):
            sched.submit(r, w)
        fake.gate.set()
        for w in (blocker, *waiters):
            w.wait()
        forwards = fake.forwards[1:]
        first = {tag for tag, _ in forwards[0]}
        assert {r[0].input_ids[0] for r in singles} <= first, "every single request in the first forward"
        bulk_tags = {t.input_ids[0] for t in bulk}
        assert all(bulk_tags & {tag for tag, _ in f} for f in forwards), "the bulk request progresses every forward"
        assert sorted(tag for f in forwards for tag, _ in f) == sorted(bulk_tags | {r[0].input_ids[0] for r in singles})
    finally:
        fake.gate.set()
        sched.stop(TIMEOUT)


def test_cancelled_request_inputs_are_dropped_before_computing():
    fake = FakeEngine()
    sched = make(fake)
    try:
        blocker = hold_worker(sched, fake)
        gone, kept = items(6, 7, 8), items(9)
        wg, wk = Waiter(), Waiter()
        job_g = sched.submit(gone, wg)
        sched.submit(kept, wk)
        assert sched.stats.queued_tokens == 30 and sched.stats.queued_requests == 2
        assert sched.cancel(job_g) == 3
        assert sched.stats.queued_tokens == 9 and sched.stats.queued_requests == 1
        assert sched.cancel(job_g) == 0, "cancelling twice drops nothing more"
        fake.gate.set()
        blocker.wait()
        wk.wait()
        computed = {tag for f in fake.forwards for tag, _ in f}
        assert not computed & {t.input_ids[0] for t in gone}
        assert kept[0].input_ids[0] in computed
        assert wg.calls == 0 and sched.stats.dropped_inputs == 3
    finally:
        fake.gate.set()
        sched.stop(TIMEOUT)


def test_queue_limit_refuses_at_once_and_recovers():
    fake = FakeEngine()
    sched = make(fake, max_queue_tokens=100)
    try:
        blocker = hold_worker(sched, fake)  # its token is in the forward, not in the queue
        w1 = Waiter()
        sched.submit(items(30, 30), w1)
        with pytest.raises(QueueFull) as err:
            sched.submit(items(41), Waiter())
        assert err.value.retry_after >= 1
        w2 = Waiter()
        sched.submit(items(40), w2)  # exactly at the limit
        assert sched.stats.queued_tokens == 100
        with pytest.raises(TooLarge):
            sched.submit(items(60, 41), Waiter())
        fake.gate.set()
        for w in (blocker, w1, w2):
            w.wait()
        assert sched.stats.queued_tokens == 0
        w3 = Waiter()
        sched.submit(items(41), w3)
        w3.wait()
        assert w3.error is None
    finally:
        fake.gate.set()
        sched.stop(TIMEOUT)


def test_failed_forward_fails_its_requests_and_the_worker_goes_on():
    fake = FakeEngine()
    sched = make(fake, max_batch_tokens=8, max_batch_size=8)
    try:
        blocker = hold_worker(sched, fake)
        bad = items(8, 8)  # two forwards; the first one fails
        fake.fail_on_tag = bad[0].input_ids[0]
        wb = Waiter()
        sched.submit(bad, wb)
        fake.gate.set()
        blocker.wait()
        wb.wait()
        assert isinstance(wb.error, RuntimeError) and wb.calls == 1
        assert bad[1].input_ids[0] not in {tag for f in fake.forwards for tag, _ in f}, "the rest is dropped"
        after = items(3)
        wa = Waiter()
        job = sched.submit(after, wa)
        wa.wait()
        assert wa.error is None
        assert_rows(job, after)
        assert sched.stats.queued_tokens == 0
    finally:
        fake.gate.set()
        sched.stop(TIMEOUT)


def test_stop_finishes_accepted_requests_then_refuses():
    fake = FakeEngine()
    sched = make(fake)
    blocker = hold_worker(sched, fake)
    queued = items(5, 6)
    wq = Waiter()
    job = sched.submit(queued, wq)
    stopper = threading.Thread(target=sched.stop, args=(TIMEOUT,))
    stopper.start()
    fake.gate.set()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert blocker.event.is_set() and wq.event.is_set() and wq.error is None
    assert_rows(job, queued)
    with pytest.raises(NotAccepting):
        sched.submit(items(1), Waiter())


def test_warmup_runs_before_ready_and_a_failure_is_reported():
    fake = FakeEngine()
    order = []
    sched = Scheduler(fake.embed, plan_batches, HIDDEN, max_batch_tokens=8, max_batch_size=8, max_queue_tokens=64,
                      warmup=lambda: order.append("warmup"))
    with pytest.raises(NotAccepting):
        sched.submit(items(1), Waiter())
    ready = threading.Event()
    sched.on_ready = lambda seconds: (order.append("ready"), ready.set())
    sched.start()
    assert sched.ready.wait(TIMEOUT) and ready.wait(TIMEOUT) and order == ["warmup", "ready"]
    sched.stop(TIMEOUT)

    failures = []

    def broken():
        raise RuntimeError("no kernel image")

    sched = Scheduler(fake.embed, plan_batches, HIDDEN, max_batch_tokens=8, max_batch_size=8, max_queue_tokens=64,
                      warmup=broken)
    sched.on_failure = failures.append
    sched.start()
    sched.stop(TIMEOUT)
    assert not sched.ready.is_set() and isinstance(sched.failed, RuntimeError) and failures == [sched.failed]
