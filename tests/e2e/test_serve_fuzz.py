"""Fuzzing the request schemas with hypothesis: bodies mixing valid and invalid values
of every field never get a 5xx, and the server is healthy afterwards."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from graftlm.serve import build_backend
from serve_support import model_with_adapters, thread_server

pytestmark = pytest.mark.slow

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                 st.text(max_size=20), st.lists(st.integers(-5, 500), max_size=4),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def field(valid):
    """A field's value: usually valid, sometimes anything."""
    return st.one_of(valid, valid, junk)


models = field(st.sampled_from(["model", "a1", "nope", "", "../a1", "A1"]))
common = {
    "model": models,
    "max_tokens": field(st.integers(-2, 6) | st.just(None) | st.just(10**9)),
    "temperature": field(st.floats(-1, 2.5, allow_nan=False)),
    "top_p": field(st.floats(-0.5, 1.5, allow_nan=False)),
    "stop": field(st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6)),
    "seed": field(st.integers(-2**65, 2**65) | st.none()),
    "n": field(st.integers(-1, 20)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": field(st.none() | st.integers(0, 3)),
}
prompt = st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3),
                   st.lists(st.integers(-3, 1000), max_size=5))
message = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "tool"])),
                                 "content": field(st.text(max_size=30) | st.none())})


def body(extra):
    fields = {**common, **extra}
    return st.fixed_dictionaries({}, optional=fields)


completion_bodies = body({"prompt": field(prompt)})
chat_bodies = body({"messages": field(st.lists(message, max_size=3)), "max_completion_tokens":
                    field(st.integers(-1, 5))})
adapter_bodies = st.fixed_dictionaries({}, optional={"name": field(st.text(max_size=70)),
                                                     "path": field(st.text(max_size=70))})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = model_with_adapters(tmp_path_factory.mktemp("serve_fuzz"))
    backend = build_backend(files["model"], {"a1": str(files["root"] / "a1")},
                            adapter_root=files["root"], max_batch=8)
    with thread_server(backend) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def send(client, path, payload):
    # json.dumps writes inf / nan as the non-standard Infinity / NaN: the server must refuse them
    content, headers = json.dumps(payload), {"content-type": "application/json"}
    if payload.get("stream") is True:
        with client.stream("POST", path, content=content, headers=headers) as r:
            lines = [line for line in r.iter_lines() if line]
        if r.status_code == 200:
            assert lines[-1] == "data: [DONE]"
            assert not any('"server_error"' in line for line in lines)
    else:
        r = client.post(path, content=content, headers=headers)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.status_code < 500, (path, payload, r.status_code)


SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(payload=completion_bodies)
def test_fuzz_completions(server, payload):
    send(server, "/v1/completions", payload)


@SETTINGS
@given(payload=chat_bodies)
def test_fuzz_chat(server, payload):
    send(server, "/v1/chat/completions", payload)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=adapter_bodies, name=st.text(max_size=80))
def test_fuzz_adapters(server, payload, name):
    r = server.post("/v1/adapters", content=json.dumps(payload))
    assert r.status_code < 500
    if r.status_code == 200:  # something loaded from under the root: unload it again
        assert server.delete(f"/v1/adapters/{payload['name']}").status_code == 200
    r = server.delete("/v1/adapters/" + "".join(f"%{b:02X}" for b in name.encode()))  # any bytes
    assert r.status_code < 500


def test_healthy_after_fuzzing(server):
    r = server.get("/health")
    assert r.status_code == 200 and r.json()["active"] == 0 and r.json()["waiting"] == 0
    ok = server.post("/v1/completions", json={"model": "model", "prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200
