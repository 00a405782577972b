"""A load run on loopback against `graft serve` in its own process: no 5xx, and the
server's resident memory grows less than 5% between the end of a warm-up and the end.

The run lasts GRAFT_SERVE_LOAD_SECONDS (default 60) after a warm-up of a quarter of
that (at least 10 s), during which the allocator reaches its steady state for every
batch shape the mix produces. Set it lower for a quick local check.
"""

import os
import random
import threading
import time
from collections import Counter

import httpx
import psutil
import pytest

from serve_support import model_with_adapters, process_server

pytestmark = pytest.mark.slow
SECONDS = float(os.environ.get("GRAFT_SERVE_LOAD_SECONDS", "60"))
CLIENTS = 6


def one_request(client: httpx.Client, rng: random.Random) -> int:
    model = rng.choice(["model", "a1", "a2"])
    kind = rng.random()
    if kind < 0.35:
        r = client.post("/v1/completions", json={"model": model, "prompt": rng.choice(["ROMEO:", "KING", "a"]),
                                                 "max_tokens": rng.randint(1, 24), "temperature": rng.random(),
                                                 "seed": rng.randint(0, 9), "n": rng.randint(1, 2)})
    elif kind < 0.6:
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": model, "messages": [{"role": "user", "content": "hello"}],
                                 "max_tokens": rng.randint(1, 24), "stream": True}) as r:
            for _ in r.iter_lines():
                pass
    elif kind < 0.7:  # a client that leaves mid-stream
        with client.stream("POST", "/v1/completions",
                           json={"model": model, "prompt": "x", "max_tokens": 60, "stream": True}) as r:
            next(r.iter_lines(), None)
    elif kind < 0.9:  # malformed
        r = client.post("/v1/completions", content=rng.choice([b"{", b"[]", b'{"model": "nope", "prompt": "a"}',
                                                               b'{"model": "model", "prompt": "a", "top_p": 2}']))
    else:  # adapter churn
        r = client.post("/v1/adapters", json={"name": "a3", "path": "a3"})
        if r.status_code == 200:
            time.sleep(0.05)
            r = client.delete("/v1/adapters/a3")
    return r.status_code


def drive(url: str, seconds: float, statuses: Counter, seed: int) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            statuses[one_request(client, rng)] += 1


def run(url: str, seconds: float) -> Counter:
    statuses = Counter()
    threads = [threading.Thread(target=drive, args=(url, seconds, statuses, i)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_load_no_5xx_and_no_memory_growth(tmp_path):
    files = model_with_adapters(tmp_path)
    args = ["--model", str(files["model"]), "--adapter", f"a1={files['root'] / 'a1'}",
            "--adapter", f"a2={files['root'] / 'a2'}", "--adapter-root", str(files["root"]),
            "--max-batch", "8", "--max-queue", "64"]
    with process_server(args, tmp_path / "server.log") as (url, proc):
        server = psutil.Process(proc.pid)
        warm = run(url, max(10.0, SECONDS / 4))
        baseline = server.memory_info().rss
        statuses = run(url, SECONDS)
        final = server.memory_info().rss
        health = httpx.get(url + "/health").json()
    total = warm + statuses
    assert not [s for s in total if s >= 500], total
    assert statuses[200] > 50, statuses
    assert health["active"] == 0 and health["waiting"] == 0
    growth = (final - baseline) / baseline
    print(f"load: {sum(statuses.values())} requests in {SECONDS:.0f}s, statuses {dict(statuses)}, "
          f"RSS {baseline / 2**20:.1f} -> {final / 2**20:.1f} MiB ({growth:+.1%})")
    assert growth < 0.05
