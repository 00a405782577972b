"""Continuous batching: one model thread, many asyncio requests, one batch of rows.

Design choices:
- The model runs in ONE background thread (torch releases the GIL in its kernels, so
  the event loop stays responsive). Everything that touches the model happens there:
  decode steps, and adapter load / unload ("control" jobs run between steps), so an
  adapter never changes under a forward pass.
- Continuous batching: between two decode steps the thread drops cancelled sequences,
  admits waiting ones (up to `max_batch` rows) and then runs one step for every active
  row. Rows of different adapters share the step; the step engine applies each row's
  adapter (`graftlm.adapters.row_adapters`).
- The step engine is a small protocol (`StepEngine`): `add` requests (prefill; they
  join the running rows), `step` every row by one token, `remove` rows. graftlm's
  `engine.Batch` is one; unit tests pass a fake. A request's `key` is its sequence id.
- Back-pressure: at most `max_queue` sequences wait for a row; beyond that `submit`
  raises `QueueFull` (HTTP 429) instead of queueing without bound.
- Results flow back through one asyncio.Queue per submission, fed with
  `loop.call_soon_threadsafe`; a submission that is cancelled (client gone) frees its
  rows before the next step.
- Unloading an adapter first hides its name (new requests get 404), then waits until
  no waiting or active sequence uses it, then unloads it in the model thread.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from graftlm.engine import Request, TokenEvent


class StepEngine(Protocol):
    """What the scheduler drives: `graftlm.engine.Batch` has exactly these methods."""

    def add(self, requests: list[Request]) -> list[TokenEvent]: ...  # prefill and join
    def step(self) -> list[TokenEvent]: ...  # one token for every row; finished rows leave
    def remove(self, keys) -> None: ...  # drop rows (cancelled requests)


class QueueFull(Exception):
    """Too many sequences are waiting; the client should retry later (HTTP 429)."""


@dataclass
class _Sequence:
    seq_id: int
    request: Request
    submission: "Submission"
    choice: int


@dataclass
class Event:
    choice: int
    output: TokenEvent | None = None
    error: str | None = None  # the model thread failed for this sequence


class Submission:
    """The sequences of one HTTP request (n choices x prompts); iterate `events()`."""

    def __init__(self, scheduler: "Scheduler", loop: asyncio.AbstractEventLoop, count: int):
        self._scheduler = scheduler
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.seq_ids: list[int] = []
        self._remaining = count

    def _post(self, event: Event) -> None:  # called from the model thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self):
        """Yield events until every sequence has finished (or failed)."""
        while self._remaining:
            event = await self._queue.get()
            if event.error is not None or (event.output and event.output.finish_reason):
                self._remaining -= 1
            yield event

    def cancel(self) -> None:
        self._scheduler.cancel(self.seq_ids)


class Scheduler:
    def __init__(self, stepper: StepEngine, max_batch: int = 16, max_queue: int = 256,
                 adapter_in_use_poll_s: float = 0.01):
        self.stepper = stepper
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._cancelled: set[int] = set()
        self._controls: deque[tuple[Callable[[], object], Callable[[object, BaseException | None], None]]] = deque()
        self._stopping = False
        self._poll_s = adapter_in_use_poll_s
        self._thread = threading.Thread(target=self._run, name="graftlm-model", daemon=True)
        self.steps = 0  # decode steps run, for tests and metrics
        self.max_rows_seen = 0  # the widest step so far
        self.cancelled_active = 0  # sequences dropped from the batch because their client left

    # -- asyncio side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=30)

    def submit(self, requests: list[Request]) -> Submission:
        """Queue `requests` (their `key` is set here); raises QueueFull when too many wait."""
        loop = asyncio.get_running_loop()
        submission = Submission(self, loop, len(requests))
        with self._lock:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are already waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            for choice, request in enumerate(requests):
                seq = _Sequence(next(self._ids), request, submission, choice)
                request.key = seq.seq_id
                submission.seq_ids.append(seq.seq_id)
                self._waiting.append(seq)
            self._lock.notify_all()
        return submission

    def cancel(self, seq_ids: list[int]) -> None:
        with self._lock:
            self._cancelled.update(seq_ids)
            self._lock.notify_all()

    async def run_control(self, job: Callable[[], object], *, when_unused: str | None = None):
        """Run `job()` in the model thread between steps and return its result.

        `when_unused`: an adapter name; the job waits until no sequence uses it.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result, error):
            def settle():
                if future.cancelled():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            loop.call_soon_threadsafe(settle)

        with self._lock:
            self._controls.append((job, done, when_unused))
            self._lock.notify_all()
        return await future

    def stats(self) -> dict:
        with self._lock:
            return {"active": len(self._active), "waiting": len(self._waiting),
                    "steps": self.steps, "max_rows_seen": self.max_rows_seen,
                    "cancelled_active": self.cancelled_active}

    # -- model thread ---------------------------------------------------------------

    def _adapter_in_use(self, name: str) -> bool:
        return any(s.request.adapter == name
                   for s in itertools.chain(self._waiting, self._active.values()))

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._active or self._controls
                           or self._cancelled):
                    self._lock.wait()
                if self._stopping:
                    return
                controls = self._ready_controls()
                cancelled, self._cancelled = self._cancelled, set()
                self._waiting = deque(s for s in self._waiting if s.seq_id not in cancelled)
                dropped = [self._active.pop(i) for i in cancelled if i in self._active]
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
                deferred_only = not (self._active or admitted) and self._controls and not controls
            for job, done in controls:
                try:
                    done(job(), None)
                except BaseException as e:  # handed to the awaiting request
                    done(None, e)
            if dropped:
                self.stepper.remove([seq.seq_id for seq in dropped])
                self.cancelled_active += len(dropped)
            if admitted:
                self._admit(admitted)
            if self._active:
                self._step()
            elif deferred_only:
                # A control waits for an adapter that queued work still uses: poll.
                with self._lock:
                    self._lock.wait(self._poll_s)

    def _ready_controls(self):
        ready, kept = [], deque()
        for job, done, when_unused in self._controls:
            if when_unused is not None and self._adapter_in_use(when_unused):
                kept.append((job, done, when_unused))
            else:
                ready.append((job, done))
        self._controls = kept
        return ready

    def _admit(self, seqs: list[_Sequence]) -> None:
        """Prefill `seqs` together; if that fails, one by one, so one bad request fails alone."""
        with self._lock:
            self._active.update((s.seq_id, s) for s in seqs)
        try:
            self._dispatch(self.stepper.add([s.request for s in seqs]))
            return
        except Exception as e:
            if len(seqs) == 1:
                self._fail(seqs, e)
                return
        for seq in seqs:
            try:
                self._dispatch(self.stepper.add([seq.request]))
            except Exception as e:  # a failure of one request must not stop the server
                self._fail([seq], e)

    def _step(self) -> None:
        with self._lock:
            self.max_rows_seen = max(self.max_rows_seen, len(self._active))
        try:
            events = self.stepper.step()
        except Exception as e:
            with self._lock:
                failed = list(self._active.values())
            self._fail(failed, e)
            return
        self.steps += 1
        self._dispatch(events)

    def _fail(self, seqs: list[_Sequence], error: Exception) -> None:
        self.stepper.remove([s.seq_id for s in seqs])
        with self._lock:
            for seq in seqs:
                self._active.pop(seq.seq_id, None)
        for seq in seqs:
            seq.submission._post(Event(seq.choice, error=f"{type(error).__name__}: {error}"))

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            with self._lock:
                seq = self._active.get(event.key)
                if seq is not None and event.finish_reason is not None:
                    del self._active[event.key]  # the batch has dropped the row already
            if seq is not None:
                seq.submission._post(Event(seq.choice, output=event))
