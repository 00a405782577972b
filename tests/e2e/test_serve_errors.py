"""Every malformed or out-of-range request is a 4xx with an OpenAI-style error body;
auth guards every route but /health; adapter paths never leave the adapter root."""

import json
import os
import shutil
import sys

import httpx
import openai
import pytest

from graftlm.serve import build_backend
from serve_support import model_with_adapters, thread_server

pytestmark = pytest.mark.slow
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_errors")
    files = model_with_adapters(tmp)
    outside = tmp / "outside"
    shutil.copytree(files["root"] / "a2", outside / "evil")
    os.symlink(outside / "evil", files["root"] / "link_out")
    half = files["root"] / "half"
    half.mkdir()
    shutil.copy(outside / "evil" / "adapter_config.json", half / "adapter_config.json")
    os.symlink(outside / "evil" / "adapter_model.safetensors", half / "adapter_model.safetensors")
    files["outside"] = outside
    return files


@pytest.fixture(scope="module")
def server(files):
    backend = build_backend(files["model"], {"a1": str(files["root"] / "a1")},
                            adapter_root=files["root"], max_batch=4)
    with thread_server(backend, api_key=KEY, max_body_bytes=MAX_BODY) as url:
        yield url, backend


def post(url, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={**AUTH, "content-type": "application/json"},
                      timeout=60, **kw)


def assert_openai_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


C = {"model": "model", "prompt": "hi", "max_tokens": 2}
M = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [
    ("/v1/completions", b"{bad json", 400),
    ("/v1/completions", b"", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", b'{"model": "model", "prompt": "hi", "temperature": NaN}', 400),
    ("/v1/completions", b'{"model": "model", "prompt": "\xff\xfe"}', 400),
    ("/v1/completions", b"[" * 30_000 + b"]" * 30_000, 400),
    ("/v1/completions", {**C, "model": "nope"}, 404),
    ("/v1/completions", {"prompt": "hi"}, 400),
    ("/v1/completions", {**C, "prompt": 5}, 400),
    ("/v1/completions", {**C, "prompt": [10**9]}, 400),
    ("/v1/completions", {**C, "prompt": []}, 400),
    ("/v1/completions", {**C, "max_tokens": 0}, 400),
    ("/v1/completions", {**C, "max_tokens": -3}, 400),
    ("/v1/completions", {**C, "max_tokens": 10**6}, 400),
    ("/v1/completions", {**C, "max_tokens": "many"}, 400),
    ("/v1/completions", {**C, "prompt": "hello " * 400}, 400),  # past the context
    ("/v1/completions", {**C, "temperature": -0.5}, 400),
    ("/v1/completions", {**C, "top_p": 0}, 400),
    ("/v1/completions", {**C, "top_p": 1.5}, 400),
    ("/v1/completions", {**C, "n": 0}, 400),
    ("/v1/completions", {**C, "n": 1000}, 400),
    ("/v1/completions", {**C, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {**C, "stop": [""]}, 400),
    ("/v1/completions", {**C, "logprobs": 5}, 400),
    ("/v1/completions", {**C, "seed": 2**70}, 400),
    ("/v1/chat/completions", {**M, "messages": []}, 400),
    ("/v1/chat/completions", {**M, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {**M, "messages": [{"content": "hi"}]}, 400),
    ("/v1/chat/completions", {**M, "messages": "hi"}, 400),
    ("/v1/chat/completions", {**M, "model": "../a1"}, 404),
    ("/v1/chat/completions", {**M, "max_tokens": 0}, 400),
    ("/v1/chat/completions", {**M, "max_completion_tokens": 10**6}, 400),
    ("/v1/chat/completions", {**M, "temperature": -1}, 400),
    ("/v1/chat/completions", {**M, "top_p": -0.1}, 400),
    ("/v1/adapters", {"name": "x"}, 400),
    ("/v1/adapters", {"name": "x", "path": "a1", "extra": 1}, 400),
    ("/v1/adapters", {"name": "a1", "path": "a1"}, 409),
    ("/v1/adapters", {"name": "model", "path": "a1"}, 409),
    ("/v1/adapters", {"name": "new", "path": "missing"}, 404),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_request_is_4xx_with_error_body(server, path, body, status):
    assert_openai_error(post(server[0], path, body), status)


def test_bad_requests_through_openai_client(server):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="model", messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="model", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"


def test_body_size_limit(server):
    url = server[0]
    big = json.dumps({**C, "prompt": "x" * (MAX_BODY * 2)}).encode()
    assert_openai_error(post(url, "/v1/completions", big), 413)

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(64):
            yield b" " * 4096
    r = httpx.post(url + "/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert_openai_error(r, 413)
    assert httpx.get(url + "/health").status_code == 200


def test_every_route_requires_the_key(server):
    url, _ = server
    routes = [(method, route.path.replace("{name}", "a1")) for route in server_app_routes(server[1])
              for method in route.methods - {"HEAD", "OPTIONS"} if route.path != "/health"]
    routes += [("GET", "/no/such/route"), ("GET", "/health/"), ("GET", "/health/../v1/models")]
    assert {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
            ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/a1"), ("GET", "/openapi.json")} <= set(routes)
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"bearer {KEY[:-1]}"}):
            r = httpx.request(method, url + path, headers=headers, timeout=30)
            assert_openai_error(r, 401)
    for method, path in routes:
        if method != "DELETE":  # keep a1 loaded
            assert httpx.request(method, url + path, headers=AUTH, timeout=30).status_code != 401
    assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    ids = [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list().data]
    assert ids == ["model", "a1"]


def server_app_routes(backend):
    """The routes of the app, read from a second app built by the same factory."""
    from starlette.routing import Route

    from graftlm.serve import create_app
    return [r for r in create_app(backend, api_key=KEY).routes if isinstance(r, Route)]


TRAVERSALS = ["../outside/evil", "a1/../../outside/evil", "./../outside/evil", "{outside}/evil",
              "%2e%2e/outside/evil", "..%2Foutside%2Fevil", "%252e%252e/outside", "link_out", "half",
              "a1\x00", "a1\x00/../../outside/evil", "a" * 5000, ("b" * 300) + "/x", "~/evil",
              "a1\\..\\..\\outside\\evil", "..", ".", "/", "//etc/passwd"]


def test_path_traversal_refused_and_nothing_outside_opened(server, files):
    url, backend = server
    outside = str(files["outside"].resolve())
    opened = []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            if os.path.realpath(path).startswith(outside):
                opened.append(path)
    sys.addaudithook(hook)  # cannot be removed; it only appends to a local list
    with open(files["outside"] / "evil" / "adapter_config.json"):
        pass
    assert opened, "the audit hook does not see opens"
    opened.clear()
    for i, path in enumerate(TRAVERSALS):
        path = path.format(outside=outside)
        r = post(url, "/v1/adapters", {"name": f"t{i}", "path": path})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert_openai_error(r, r.status_code)
    for name in ["../evil", "a/b", "%2e%2e", "x" * 65, "a\x00", ".hidden", "a..b", ""]:
        r = post(url, "/v1/adapters", {"name": name, "path": "a2"})
        assert_openai_error(r, 400)
    for raw in ["/v1/adapters/..%2F..%2Fetc", "/v1/adapters/%2e%2e", "/v1/adapters/a%00b",
                "/v1/adapters/" + "x" * 300]:
        r = httpx.request("DELETE", url + raw, headers=AUTH, timeout=30)
        assert 400 <= r.status_code < 500, (raw, r.status_code)
    assert opened == []
    assert [e.name for e in backend.registry.entries()] == ["a1"]
    assert httpx.get(url + "/health").status_code == 200


def test_adapter_loading_disabled_without_root(files):
    backend = build_backend(files["model"], max_batch=2)
    with thread_server(backend) as url:
        r = httpx.post(url + "/v1/adapters", json={"name": "a2", "path": "a2"})
        assert_openai_error(r, 403)


def test_an_adapter_of_another_base_loads_only_when_the_operator_allows_it(files, tmp_path):
    import torch

    from graftlm.adapters import AdapterConfig, apply_adapters, save_adapter
    from graftlm.models.hf import load_model
    tuned = load_model(files["model"])
    with torch.no_grad():  # the same architecture, other weights: a fine-tuned variant
        for param in tuned.parameters():
            param.mul_(1.1)
    save_adapter(apply_adapters(tuned, AdapterConfig(r=2)), tmp_path / "tuned")
    for allow, status in ((False, 400), (True, 200)):
        backend = build_backend(files["model"], adapter_root=tmp_path, max_batch=2, allow_other_base=allow)
        with thread_server(backend) as url:
            r = httpx.post(url + "/v1/adapters", json={"name": "tuned", "path": "tuned"})
            assert r.status_code == status, r.text
            if not allow:
                assert_openai_error(r, 400)
                message = r.json()["error"]["message"]
                assert "other weights" in message
                assert message.startswith("adapter 'tuned' cannot be loaded: tuned") and str(tmp_path) not in message
