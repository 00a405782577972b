"""The serving app in-process (FastAPI's TestClient) on a tiny model: a base that a QLoRA
adapter quantized says so; max_tokens left out is clamped to what the context leaves;
and `graft serve` refuses a busy port and a duplicate adapter name before loading
anything."""

import socket

import pytest
from fastapi.testclient import TestClient

from graftlm.cli import main
from graftlm.serve import build_backend, create_app
from graftlm.serve_cli import ready_line
from tests.conftest import make_hf_model

CONTEXT = 128  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model with a ChatML tokenizer, and a QLoRA adapter of it under `root`."""
    import graftlm.adapters as A
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import train_tokenizer
    tmp = tmp_path_factory.mktemp("serve_app")
    tok = train_tokenizer(iter(["to be or not to be, that is the question"] * 20), 300)
    make_hf_model("llama", tmp / "model", vocab_size=tok.vocab_size)
    tok.save(tmp / "model")
    qlora = A.apply_adapters(load_model(tmp / "model"), A.AdapterConfig(kind="qlora", r=2))
    A.save_adapter(qlora, tmp / "root" / "q")
    return {"model": tmp / "model", "root": tmp / "root"}


def app_client(backend):
    backend.scheduler.start()
    return TestClient(create_app(backend))


@pytest.fixture(scope="module")
def client(files):
    backend = build_backend(files["model"], max_batch=4)
    with app_client(backend) as client:
        yield client
    backend.scheduler.stop()


# --- a QLoRA adapter's 4-bit base is said to be served --------------------------------

def base_quantization(client):
    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == "model" and client.get("/v1/models/model").json() == models[0]
    assert client.get("/health").json()["base_quantization"] == models[0]["quantization"]
    return models[0]["quantization"]


def test_a_base_shared_with_qlora_adapters_is_said_to_be_nf4(files):
    started = build_backend(files["model"], {"q": str(files["root"] / "q")}, max_batch=2)
    assert started.base_quantization == "nf4"
    assert ready_line(started, "http://h:1", "q") == \
        "serving model (in 4-bit NF4, shared with its QLoRA adapters) on http://h:1 (adapters: q)"
    with app_client(started) as client:
        assert base_quantization(client) == "nf4"
    started.scheduler.stop()

    backend = build_backend(files["model"], adapter_root=files["root"], max_batch=2)
    assert ready_line(backend, "http://h:1", "none") == "serving model on http://h:1 (adapters: none)"
    with app_client(backend) as client:
        assert base_quantization(client) is None
        assert client.post("/v1/adapters", json={"name": "q", "path": "q"}).status_code == 200
        assert base_quantization(client) == "nf4"
        # Unloading the adapter leaves the base quantized: it still says so.
        assert client.delete("/v1/adapters/q").status_code == 200
        assert base_quantization(client) == "nf4"
    backend.scheduler.stop()


# --- max_tokens left out ------------------------------------------------------------------

def complete(client, path, **body):
    return client.post(path, json={"model": "model", "temperature": 0, **body})


def test_completion_default_max_tokens_is_clamped_to_the_context_left(client):
    r = complete(client, "/v1/completions", prompt=[5] * (CONTEXT - 3))
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 3
    r = complete(client, "/v1/completions", prompt=[5] * 4)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16  # OpenAI's default
    if r.json()["choices"][0]["finish_reason"] == "length":
        assert r.json()["usage"]["completion_tokens"] == 16


def test_a_prompt_filling_the_context_or_an_explicit_max_tokens_past_it_is_refused(client):
    for path, body in (("/v1/completions", {"prompt": [5] * CONTEXT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "to be " * 200}]})):
        r = complete(client, path, **body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] in ("prompt", "messages")
        assert err["message"].startswith("the prompt has ") and "max_tokens" not in err["message"]
    r = complete(client, "/v1/completions", prompt=[5] * (CONTEXT - 3), max_tokens=16)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert r.json()["error"]["message"] == f"max_tokens 16 + prompt {CONTEXT - 3} tokens exceeds the context of {CONTEXT}"


def test_chat_without_max_tokens_takes_what_the_context_leaves(client):
    backend = client.app.state.backend

    def prompt_len(content):
        text = backend.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True)
        return len(backend.encode_prompt(text))
    content = "to be"
    while prompt_len(content) < CONTEXT - 8:  # fewer than 16 tokens left
        content += " be"
    assert prompt_len(content) < CONTEXT
    r = complete(client, "/v1/chat/completions", messages=[{"role": "user", "content": content}])
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] <= CONTEXT


# --- refusals of `graft serve` before the model loads -------------------------------------

def test_a_busy_port_is_refused_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # No model there: the port is checked first.
        assert main(["serve", "--model", str(tmp_path / "none"), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"graft serve: error: --port {port}: address already in use (binding 127.0.0.1:{port})"


def test_a_duplicate_adapter_name_is_named(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "none"), "--adapter", "a=x/one",
                 "--adapter", "a=y/two"]) == 2
    assert capsys.readouterr().err.strip() == ("graft serve: error: --adapter: the name 'a' is given twice "
                                               "(x/one, y/two); give each its own: --adapter NAME=DIR")
