"""Back-pressure and disconnects: a full queue answers 429, and a client that leaves
(streaming or not) frees its row in the scheduler."""

import threading
import time

import httpx
import pytest

from graftlm.serve import build_backend
from serve_support import build_tiny_model, thread_server

pytestmark = pytest.mark.slow
LONG = 3000  # tokens: far longer than any test waits for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model whose greedy decoding never stops on its own: the output rows of the
    stop tokens are zero, so their logit is 0 while the largest of ~380 random logits is
    positive. Requests then run until max_tokens or until the client leaves."""
    from safetensors.torch import load_file, save_file

    from graftlm.tokenizer import load_tokenizer
    model_dir = build_tiny_model(tmp_path_factory.mktemp("serve_limits") / "model", context=4096)
    weights = load_file(model_dir / "model.safetensors")
    weights["lm_head.weight"][load_tokenizer(model_dir).stop_ids] = 0
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


@pytest.fixture
def long_request():
    def make(stream: bool) -> dict:
        return {"model": "model", "prompt": "ROMEO:", "max_tokens": LONG, "temperature": 0,
                "stream": stream}
    return make


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def stats(url):
    return httpx.get(url + "/health").json()


def test_streaming_client_that_leaves_frees_its_row(model_dir, long_request):
    backend = build_backend(model_dir, max_batch=4)
    with thread_server(backend) as url:
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url + "/v1/completions", json=long_request(True)) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(4)]
                assert all(line.startswith("data: ") or line == "" for line in got)
                assert stats(url)["active"] == 1
            # leaving the block closes the connection mid-stream
        assert wait_for(lambda: stats(url)["active"] == 0)
        s = stats(url)
        assert s["cancelled_active"] == 1 and s["steps"] < LONG


def test_non_streaming_client_that_leaves_frees_its_row(model_dir, long_request):
    backend = build_backend(model_dir, max_batch=4)
    with thread_server(backend) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=long_request(False), timeout=1.0)
        assert wait_for(lambda: stats(url)["active"] == 0)
        s = stats(url)
        assert s["cancelled_active"] == 1 and s["steps"] < LONG


def test_full_queue_gets_429_and_recovers(model_dir, long_request):
    backend = build_backend(model_dir, max_batch=1, max_queue=1)
    with thread_server(backend) as url:
        statuses = []

        def call():
            r = httpx.post(url + "/v1/completions", timeout=60,
                           json={**long_request(False), "max_tokens": 200})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_error"
        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        assert stats(url)["active"] == 0 and stats(url)["waiting"] == 0
        r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
        # one request asking for more sequences than the queue can ever hold: 400, not 429
        r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": "a", "max_tokens": 2, "n": 3})
        assert r.status_code == 400
