"""The scheduler over a fake step engine (joins and leaves between steps, cancels,
queue limit, controls deferred while an adapter is in use), and the engine's merge of
a joining row into a running batch with NaN-filled fresh memory."""

import asyncio

import pytest
import torch

from graftlm.engine import Request, SamplingParams, TokenEvent
from graftlm.serve.scheduler import QueueFull, Scheduler


class FakeBatch:
    """Each row emits its key's tokens 0..max_new_tokens-1; records every step's rows."""

    def __init__(self):
        self.rows, self.steps = {}, []

    def add(self, requests):
        for r in requests:
            self.rows[r.key] = [r, 0]
        return self._advance([r.key for r in requests])

    def step(self):
        self.steps.append(sorted(self.rows))
        return self._advance(list(self.rows))

    def remove(self, keys):
        for k in keys:
            self.rows.pop(k, None)

    def _advance(self, keys):
        events = []
        for k in keys:
            row = self.rows[k]
            row[1] += 1
            done = row[1] >= row[0].params.max_new_tokens
            events.append(TokenEvent(k, row[1], f"{row[1]} ", "length" if done else None))
            if done:
                del self.rows[k]
        return events


def req(n, adapter=None):
    return Request([1, 2], SamplingParams(max_new_tokens=n, temperature=0), adapter=adapter)


async def collect(sub):
    return [e.output.text async for e in sub.events()]


def test_requests_join_and_leave_between_steps():
    async def main():
        batch = FakeBatch()
        sched = Scheduler(batch, max_batch=2, max_queue=8)
        sched.start()
        try:
            subs = [sched.submit([req(n)]) for n in (3, 1, 2)]
            texts = await asyncio.gather(*(collect(s) for s in subs))
        finally:
            sched.stop()
        assert texts == [["1 ", "2 ", "3 "], ["1 "], ["1 ", "2 "]]
        assert max(len(s) for s in batch.steps) <= 2  # never more rows than max_batch
        assert sched.stats()["active"] == 0
    asyncio.run(main())


def test_queue_limit_and_cancel():
    async def main():
        batch = FakeBatch()
        sched = Scheduler(batch, max_batch=1, max_queue=2)
        # not started: everything waits
        first = sched.submit([req(10**6)])
        sched.submit([req(1)])
        with pytest.raises(QueueFull):
            sched.submit([req(1)])
        sched.start()
        try:
            for _ in range(200):
                await asyncio.sleep(0.005)
                if sched.stats()["active"]:
                    break
            first.cancel()
            for _ in range(200):
                await asyncio.sleep(0.005)
                if sched.stats()["active"] == 0 and sched.stats()["waiting"] == 0:
                    break
            assert sched.stats()["cancelled_active"] == 1
            assert sched.stats()["active"] == 0 and not batch.rows
        finally:
            sched.stop()
    asyncio.run(main())


def test_control_waits_until_adapter_unused():
    async def main():
        batch = FakeBatch()
        sched = Scheduler(batch, max_batch=4, max_queue=8)
        sub = sched.submit([req(30, adapter="a"), req(5, adapter="b")])
        # queued before the scheduler starts, it would otherwise run at once
        control = asyncio.create_task(sched.run_control(lambda: len(batch.steps), when_unused="a"))
        await asyncio.sleep(0)
        sched.start()
        try:
            texts = await collect(sub)
            steps_when_run = await control
        finally:
            sched.stop()
        assert len(texts) == 35
        assert steps_when_run == 29  # after the last of the 30 tokens of adapter "a" (1 from prefill)
    asyncio.run(main())


def test_joining_row_is_not_poisoned_by_uninitialised_cache(tiny_hf_dir, monkeypatch):
    """A row joining a running batch equals the same row alone, even when fresh tensors
    are full of NaN (the merged cache's padding slots must be cleared)."""
    from graftlm.engine import Batch, Engine
    from graftlm.models.hf import load_model
    engine = Engine(load_model(tiny_hf_dir))
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=())
    alone = [c.token_ids for c in engine.generate([[3, 4], [5, 6, 7, 8, 9, 10, 11]], params)]
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    batch = Batch(engine)
    out = {}
    for e in batch.add([Request([3, 4], params, key="short")]):
        out.setdefault(e.key, []).append(e.token_id)
    for e in batch.add([Request([5, 6, 7, 8, 9, 10, 11], params, key="long")]):
        out.setdefault(e.key, []).append(e.token_id)
    while batch:
        for e in batch.step():
            out.setdefault(e.key, []).append(e.token_id)
    # the running row is the one shifted right, onto fresh padding slots
    assert [out["short"], out["long"]] == alone
