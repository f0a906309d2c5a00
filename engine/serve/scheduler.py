"""The batching scheduler: admission control, a queue of tokenised inputs, and the one worker thread
that owns the model and drains the queue into packed forwards.

Requests arrive tokenised (the request handlers tokenise, off the model's critical path). Admission
counts queued tokens: a request that would take the queue past ``max_queue_tokens`` is refused at
once (the server answers 429 with a Retry-After estimated from recent throughput), never parked.
Fairness: each forward is filled round-robin over the waiting requests, one input of each per pass
(the next input of every request first, then the one after, ...), until it holds ``max_batch_size``
inputs or the next input would take it past ``max_batch_tokens`` (an input longer than the budget
runs alone when its request comes first); the rotation moves on by one request per forward. So a
request of a single sentence that arrives behind a bulk request of 100k inputs rides in the very next
forward, not after the bulk's 100k, and a bulk request still makes progress in every forward. The
forward's inputs are ordered by the engine's own rule, :func:`engine.encoder.plan_batches` (longest
first). A request spans as many forwards as its inputs need and is answered as soon as its last
input is done. A cancelled request (its client disconnected) has its queued inputs dropped before
they are computed.

Rows are written into a per-request float32 array [inputs, hidden] in input order; the embedding of
an input does not depend on its batch neighbours, so results equal ``Engine.encode``'s. The arrays
are numpy, not torch: the request side (the event loop) then never calls into torch, whose ops
release the GIL and would make the event loop wait for the worker to hand it back.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..inputs import TokenizedExample

log = logging.getLogger("engine.serve")

# plan_batches(lengths, batch_size, max_batch_tokens) -> batches of indices, the engine's rule.
PlanFn = Callable[[list[int], int, int], list[list[int]]]
# embed(items) -> float32 [len(items), hidden]: one packed forward (Engine.embed_tokenized).
EmbedFn = Callable[[Sequence[TokenizedExample]], torch.Tensor]


class QueueFull(Exception):
    """Admitting the request would exceed ``max_queue_tokens``; retry after ``retry_after`` seconds."""

    def __init__(self, tokens: int, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"the queue holds {queued} tokens; {tokens} more would exceed the limit of {limit}")
        self.retry_after = retry_after


class TooLarge(Exception):
    """The request alone holds more tokens than the queue may ever hold."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the request holds {tokens} tokens, more than the queue limit of {limit} "
                         "(split it into smaller requests)")


class NotAccepting(Exception):
    """The scheduler is stopping or not started."""


@dataclass(eq=False)
class Job:
    """One request's inputs in the scheduler. ``out`` float32 [inputs, hidden] (numpy) fills in input order;
    ``on_done(error)`` is called once, from the worker thread, when the last row is written (``None``)
    or the forward failed (the exception). Times are ``time.perf_counter()`` seconds."""

    items: list[TokenizedExample]
    out: np.ndarray
    on_done: Callable[[BaseException | None], None]
    n_tokens: int
    submitted: float
    started: float | None = None  # first forward holding one of its inputs
    finished: float | None = None
    remaining: int = 0  # rows not yet written
    pending: deque[int] = field(default_factory=deque)  # indices of the inputs not yet taken into a forward
    queued_tokens: int = 0  # their tokens
    cancelled: bool = False
    done: bool = False


@dataclass(frozen=True)
class _Entry:
    job: Job
    index: int

    @property
    def n_tokens(self) -> int:
        return self.job.items[self.index].num_tokens


@dataclass
class Stats:
    """Counters the metrics read; updated under the scheduler's lock."""

    queued_requests: int = 0
    queued_tokens: int = 0
    tokens_per_s: float = 0.0  # exponential moving average over forwards
    dropped_inputs: int = 0


class Scheduler:
    """Owns the worker thread. ``observer`` (optional) gets ``forward(n_inputs, n_tokens, n_requests,
    seconds)``, ``queue_wait(seconds)``, ``inference(seconds)`` and ``dropped(n_inputs)`` calls."""

    def __init__(
        self,
        embed: EmbedFn,
        plan: PlanFn,
        hidden_size: int,
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_queue_tokens: int,
        warmup: Callable[[], object] | None = None,
        observer: object | None = None,
    ) -> None:
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_batch_size", max_batch_size),
                            ("max_queue_tokens", max_queue_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        self._embed, self._plan, self.hidden_size = embed, plan, hidden_size
        self.max_batch_tokens, self.max_batch_size, self.max_queue_tokens = max_batch_tokens, max_batch_size, max_queue_tokens
        self._warmup, self._observer = warmup, observer
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()  # requests with inputs waiting, in round-robin order
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = Stats()
        self.ready = threading.Event()
        self.failed: BaseException | None = None  # set when warm-up failed: the worker never started
        self.on_failure: Callable[[BaseException], None] | None = None
        self.on_ready: Callable[[float], None] | None = None  # gets the warm-up's seconds

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker: warm-up first (``ready`` is set after it), then the drain loop."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every input already accepted, then end the worker. New submissions are refused."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def accepting(self) -> bool:
        return self.ready.is_set() and not self._stopping

    # -- the request side ----------------------------------------------------------------------------

    def submit(self, items: list[TokenizedExample], on_done: Callable[[BaseException | None], None]) -> Job:
        """Queue ``items`` (one request) or raise :class:`QueueFull`, :class:`TooLarge` or
        :class:`NotAccepting` at once. ``on_done`` is called from the worker thread."""
        n_tokens = sum(t.num_tokens for t in items)
        if n_tokens > self.max_queue_tokens:
            raise TooLarge(n_tokens, self.max_queue_tokens)
        job = Job(items, np.empty((len(items), self.hidden_size), dtype=np.float32), on_done, n_tokens,
                  time.perf_counter(), remaining=len(items), pending=deque(range(len(items))),
                  queued_tokens=n_tokens)
        with self._cond:
            if not self.accepting:
                raise NotAccepting("the server is not accepting requests (warming up or shutting down)")
            stats = self.stats
            if stats.queued_tokens + n_tokens > self.max_queue_tokens:
                raise QueueFull(n_tokens, stats.queued_tokens, self.max_queue_tokens,
                                self._retry_after(stats.queued_tokens + n_tokens))
            if not items:
                job.done = True
            else:
                self._jobs.append(job)
                stats.queued_requests += 1
                stats.queued_tokens += n_tokens
                self._cond.notify()
        if job.done:
            job.started = job.finished = job.submitted
            on_done(None)
        return job

    def cancel(self, job: Job) -> int:
        """Drop the job's inputs that are still queued (its client is gone); returns how many.
        Inputs already in a running forward finish, and their rows are discarded."""
        with self._cond:
            if job.done or job.cancelled:
                return 0
            job.cancelled = True
            dropped = len(job.pending)
            self._take(job, dropped, job.queued_tokens)
            self.stats.dropped_inputs += dropped
        if dropped:
            self._notify("dropped_inputs", dropped)
        return dropped

    def _retry_after(self, tokens: int) -> int:
        """Seconds until ``tokens`` queued tokens are likely drained, from recent throughput (1..60)."""
        rate = self.stats.tokens_per_s
        return 1 if rate <= 0 else max(1, min(60, math.ceil(tokens / rate)))

    def _take(self, job: Job, n_inputs: int, n_tokens: int) -> None:
        """The first ``n_inputs`` waiting inputs of ``job`` (``n_tokens`` together) leave the queue,
        into a forward or dropped; a request with none left waiting leaves the rotation (lock held)."""
        if n_inputs == len(job.pending):
            job.pending.clear()
        else:
            for _ in range(n_inputs):
                job.pending.popleft()
        job.queued_tokens -= n_tokens
        self.stats.queued_tokens -= n_tokens
        if n_inputs and not job.pending:
            self.stats.queued_requests -= 1
            self._jobs.remove(job)

    # -- the worker ----------------------------------------------------------------------------------

    def _run(self) -> None:
        t = time.perf_counter()
        if self._warmup is not None:
            try:
                self._warmup()
            except BaseException as exc:  # a broken device or kernel: the server cannot serve
                log.exception("warm-up failed")
                self.failed = exc
                if self.on_failure is not None:
                    self.on_failure(exc)
                return
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready(time.perf_counter() - t)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._forward(batch)

    def _next_batch(self) -> list[_Entry] | None:
        """Wait for inputs, then take the next forward's (see the module docstring). None once
        stopping and nothing waits."""
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            picked = self._round_robin()
            (order,) = self._plan([e.n_tokens for e in picked], self.max_batch_size, self.max_batch_tokens)
            for entry in picked:  # each request's inputs are taken from the front, in order
                self._take(entry.job, 1, entry.n_tokens)
            self._jobs.rotate(-1)
            return [picked[i] for i in order]

    def _round_robin(self) -> list[_Entry]:
        """One input of each waiting request per pass, in rotation order, within both budgets; a
        request whose next input does not fit is left for a later forward. The first request's first
        input is always taken, alone if it exceeds the token budget by itself (lock held)."""
        head = self._jobs[0]
        first = _Entry(head, head.pending[0])
        if first.n_tokens >= self.max_batch_tokens:
            return [first]
        picked, tokens = [], 0
        cursors = [(job, iter(job.pending)) for job in self._jobs]
        while cursors and len(picked) < self.max_batch_size:
            still = []
            for job, cursor in cursors:
                index = next(cursor, None)
                if index is None:
                    continue
                entry = _Entry(job, index)
                if tokens + entry.n_tokens > self.max_batch_tokens or len(picked) == self.max_batch_size:
                    continue  # this request's next input waits for a later forward
                picked.append(entry)
                tokens += entry.n_tokens
                still.append((job, cursor))
            cursors = still
        return picked

    def _forward(self, batch: list[_Entry]) -> None:
        start = time.perf_counter()
        jobs = list(dict.fromkeys(e.job for e in batch))
        for job in jobs:
            if job.started is None:
                job.started = start
                self._notify("queue_wait", start - job.submitted)
        try:
            rows = self._embed([e.job.items[e.index] for e in batch]).numpy()
        except Exception as exc:  # one bad forward (out of memory, say) fails its requests, not the server
            log.exception("forward of %d inputs failed", len(batch))
            with self._cond:
                for job in jobs:
                    if not job.done:
                        job.done = job.cancelled = True
                        self._take(job, len(job.pending), job.queued_tokens)
            for job in jobs:
                job.on_done(exc)
            return
        end = time.perf_counter()
        n_tokens = sum(e.n_tokens for e in batch)
        finished = []
        with self._cond:
            stats = self.stats
            rate = n_tokens / max(end - start, 1e-9)
            stats.tokens_per_s = rate if stats.tokens_per_s == 0 else 0.8 * stats.tokens_per_s + 0.2 * rate
            for k, entry in enumerate(batch):
                job = entry.job
                if job.cancelled:
                    continue
                job.out[entry.index] = rows[k]
                job.remaining -= 1
                if job.remaining == 0:
                    job.done = True
                    job.finished = end
                    finished.append(job)
        self._notify("forward", len(batch), n_tokens, len(jobs), end - start)
        for job in finished:
            self._notify("inference", end - job.started)
            job.on_done(None)

    def _notify(self, event: str, *args: float) -> None:
        if self._observer is not None:
            getattr(self._observer, event)(*args)
