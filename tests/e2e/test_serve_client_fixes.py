"""What a user of the official `openai` client sees: seeds of n > 1 choices and of
several prompts that do not repeat across requests or rows, GET /v1/models/{id}, plain validation messages, the base model
refused by DELETE /v1/adapters, and the served id of a run's `final/` directory."""

import httpx
import openai
import pytest

from graftlm.serve import build_backend

pytestmark = pytest.mark.slow


def test_nearby_seeds_share_no_samples_and_choice_0_is_the_seed_itself(client):
    kw = dict(model="model", prompt="To be", max_tokens=12, temperature=1.0)
    one = [c.text for c in client.completions.create(**kw, seed=1, n=3).choices]
    two = [c.text for c in client.completions.create(**kw, seed=2, n=3).choices]
    assert len(set(one)) == 3 and len(set(two)) == 3
    assert not set(one) & set(two), (one, two)
    assert [c.text for c in client.completions.create(**kw, seed=1, n=3).choices] == one
    assert client.completions.create(**kw, seed=1).choices[0].text == one[0]
    assert client.completions.create(**kw, seed=2).choices[0].text == two[0]


def test_prompts_of_one_request_take_their_own_seeds(client):
    """A list of prompts with a seed: each row of the request has its own stream (the same
    prompt twice gives two samples), and the first row is the seed itself."""
    kw = dict(model="model", max_tokens=12, temperature=1.0, seed=5)
    texts = [c.text for c in client.completions.create(**kw, prompt=["To be", "To be"], n=2).choices]
    assert len(set(texts)) == 4, texts
    assert client.completions.create(**kw, prompt="To be").choices[0].text == texts[0]


def test_models_retrieve_base_and_adapter_and_unknown(client):
    listed = {m.id: m for m in client.models.list().data}
    for name in ("model", "a1"):
        assert client.models.retrieve(name) == listed[name]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


C = {"model": "model", "prompt": "hi", "max_tokens": 2}
M = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PLAIN = [
    ("/v1/completions", {**C, "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop: must have at most 4 items"),
    ("/v1/completions", {**C, "stop": ""}, "stop", "stop: must not be an empty string"),
    ("/v1/completions", {**C, "stop": ["a", ""]}, "stop", "stop[1]: must not be an empty string"),
    ("/v1/completions", {**C, "prompt": []}, "prompt", "prompt: must not be an empty list"),
    ("/v1/completions", {**C, "prompt": 5}, "prompt", "prompt: must be a string, a non-empty list of strings"),
    ("/v1/completions", {**C, "temperature": "hot"}, "temperature", "temperature: must be a number"),
    ("/v1/completions", {"prompt": "hi"}, "model", "model: is required"),
    ("/v1/chat/completions", {**M, "messages": [{"role": "user", "content": 5}]}, "messages",
     "messages[0].content: must be a string or a list of text parts"),
    ("/v1/chat/completions", {**M, "messages": [{"role": "robot", "content": "x"}]}, "messages",
     "messages[0].role: must be 'system', 'developer', 'user' or 'assistant'"),
]


@pytest.mark.parametrize("path,body,param,message", PLAIN, ids=[str(i) for i in range(len(PLAIN))])
def test_validation_errors_name_the_field_in_plain_words(server, path, body, param, message):
    r = httpx.post(server[0] + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_value"
    assert err["message"].startswith(message), err["message"]
    for internal in ("constrained", "Input should", "list[", "str."):
        assert internal not in err["message"], err["message"]


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_a_penalty_is_an_unsupported_parameter(client, name):
    for value in (1.0, -0.5):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="model", prompt="hi", max_tokens=2, **{name: value})
        assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == name
        assert e.value.body["message"] == f"'{name}' is not supported by this server"
    for value in (0, 0.0):  # the default is accepted
        client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, **{name: value})


def test_unknown_route_and_method_have_word_codes(server):
    r = httpx.get(server[0] + "/v1/no/such/route", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "GET /v1/no/such/route" in r.json()["error"]["message"]
    r = httpx.put(server[0] + "/v1/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_deleting_the_base_model_is_refused_as_such(server):
    r = httpx.delete(server[0] + "/v1/adapters/model", timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] == "the base model cannot be unloaded"
    assert err["param"] == "name" and err["code"] == "base_model"
    assert httpx.get(server[0] + "/v1/models/model", timeout=30).status_code == 200


def test_a_runs_final_directory_is_served_under_the_runs_name(files, tmp_path):
    import shutil
    final = tmp_path / "runs" / "sft" / "final"
    shutil.copytree(files["model"], final)
    lone = tmp_path / "elsewhere" / "final"  # no run beside it: the directory's name
    shutil.copytree(files["model"], lone)
    (final.parent / "summary.json").write_text("{}\n")
    assert build_backend(final, max_batch=1).registry.base_name == "sft"
    assert build_backend(final, max_batch=1, base_name="mine").registry.base_name == "mine"
    assert build_backend(lone, max_batch=1).registry.base_name == "final"


def test_serve_help_says_how_to_load_and_unload_adapters():
    import os
    import subprocess
    import sys
    from serve_support import ROOT
    out = subprocess.run([sys.executable, "-m", "graftlm", "serve", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"}).stdout
    text = " ".join(out.split())
    assert 'POST /v1/adapters with the JSON body {"name": NAME, "path": PATH}' in text
    assert "DELETE /v1/adapters/NAME returns once the requests still using it have finished" in text
