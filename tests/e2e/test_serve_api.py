"""The real server on 127.0.0.1, driven by the official `openai` client: completions,
chat, streaming, the model field choosing base or adapter, load / unload at run time,
and isolation of rows that share a batch."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_support import process_server

pytestmark = pytest.mark.slow


def greedy(client, model, prompt, max_tokens=12):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["model", "a1"]


def test_completion_usage_and_length(client, server):
    tok = server[1].tokenizer
    r = client.completions.create(model="model", prompt="ROMEO:", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.usage.prompt_tokens == len(tok.encode("ROMEO:"))
    assert r.usage.completion_tokens <= 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7


def test_seeded_sampling_repeats_and_n_choices_differ(client):
    kw = dict(model="model", prompt="To be", max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3)
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1  # a seed per choice (engine.row_seed)


def test_stop_string_cuts_text(client):
    text = greedy(client, "model", "ROMEO:", max_tokens=20)
    assert len(text) > 3
    stop = text[2:4]
    r = client.completions.create(model="model", prompt="ROMEO:", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.find(stop)]


def test_chat_applies_template(client, server):
    tok = server[1].tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="model", messages=messages, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(rendered))
    # the same prompt as a plain completion gives the same greedy text
    assert greedy(client, "model", rendered, 5) == r.choices[0].message.content


def test_streaming_completion_and_chat_match_non_streaming(client):
    chunks = list(client.completions.create(model="a1", prompt="ROMEO:", max_tokens=12, temperature=0,
                                            stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks) == greedy(client, "a1", "ROMEO:")
    messages = [{"role": "user", "content": "Hi"}]
    stream = client.chat.completions.create(model="model", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="model", messages=messages, max_tokens=8, temperature=0)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_ends_with_done(server):
    with httpx.stream("POST", server[0] + "/v1/completions",
                      json={"model": "model", "prompt": "a", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_model_field_chooses_adapter(client):
    assert greedy(client, "model", "ROMEO:") != greedy(client, "a1", "ROMEO:")


def test_load_use_unload_without_reloading_base(client, server):
    url, backend = server
    embed = backend.model.embed_tokens.weight
    before = (embed.data_ptr(), greedy(client, "model", "ROMEO:"))
    r = httpx.post(url + "/v1/adapters", json={"name": "a2", "path": "a2"})
    assert r.status_code == 200, r.text
    assert "a2" in [m.id for m in client.models.list().data]
    with_a2 = greedy(client, "a2", "ROMEO:")
    assert with_a2 not in (before[1], greedy(client, "a1", "ROMEO:"))
    assert httpx.post(url + "/v1/adapters", json={"name": "a2", "path": "a2"}).status_code == 409
    assert httpx.delete(url + "/v1/adapters/a2").status_code == 200
    assert "a2" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        greedy(client, "a2", "ROMEO:")
    assert httpx.delete(url + "/v1/adapters/a2").status_code == 404
    assert (backend.model.embed_tokens.weight.data_ptr(), greedy(client, "model", "ROMEO:")) == before
    # loading it again gives the same outputs as before
    assert httpx.post(url + "/v1/adapters", json={"name": "a2", "path": "a2"}).status_code == 200
    assert greedy(client, "a2", "ROMEO:") == with_a2
    assert httpx.delete(url + "/v1/adapters/a2").status_code == 200


def test_mixed_batch_equals_each_request_alone(client, server):
    """Base, a1 and a2 rows share decode steps; each greedy output equals its solo run."""
    url, backend = server
    assert httpx.post(url + "/v1/adapters", json={"name": "a2", "path": "a2"}).status_code == 200
    jobs = [(m, p) for p in ("ROMEO:", "First Citizen:\nWe", "KING") for m in ("model", "a1", "a2")]
    alone = [greedy(client, m, p, 24) for m, p in jobs]
    for _ in range(3):  # concurrent arrival is not guaranteed on a busy machine: retry
        backend.scheduler.max_rows_seen = 0
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: greedy(client, job[0], job[1], 24), jobs))
        assert together == alone
        if backend.scheduler.max_rows_seen >= 3:
            break
    assert backend.scheduler.max_rows_seen >= 3, "the requests never shared a batch"
    assert httpx.delete(url + "/v1/adapters/a2").status_code == 200


def test_graft_serve_says_when_it_is_ready(files, tmp_path):
    args = ["--model", str(files["model"]), "--adapter", f"a1={files['root'] / 'a1'}",
            "--adapter-root", str(files["root"])]
    with process_server(args, tmp_path / "server.log") as (url, _):
        # Printed before the first request is answered: by now it is in the log.
        said = (tmp_path / "server.log").read_text().strip().splitlines()
    assert f"serving model on {url} (adapters: a1; more from {files['root']})" in said
