"""`graft serve --compile`: the server decodes with the engine's compiled step, compiled
before it listens, and answers concurrent requests as the eager engine does."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from torch._dynamo.utils import counters

from graftlm.adapters import load_adapter
from graftlm.cli import main
from graftlm.engine import Engine, SamplingParams
from graftlm.errors import GraftError
from graftlm.models.hf import load_model
from graftlm.serve import build_backend
from graftlm.tokenizer import load_tokenizer
from serve_support import model_with_adapters, thread_server

pytestmark = pytest.mark.slow

PROMPTS = ["ROMEO: what light", "KING:", "First Citizen:\nBefore we proceed", "O", "To be, or not"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return model_with_adapters(tmp_path_factory.mktemp("serve_compiled"))


def test_compiled_server_answers_concurrent_requests_as_the_eager_engine(files):
    # With an adapter: base requests decode compiled, steps with an adapter row eagerly.
    backend = build_backend(files["model"], {"a1": str(files["root"] / "a1")}, max_batch=8, compile=True)
    graphs = counters["stats"]["unique_graphs"]  # both graphs are compiled by now
    eager = Engine(load_model(files["model"]), load_tokenizer(files["model"]))
    load_adapter(eager.model, files["root"] / "a1", "a1")
    want = {(p, n, model): eager.generate([p], SamplingParams(max_new_tokens=n, temperature=0),
                                          adapters=[None if model == "base" else model])[0].text
            for p in PROMPTS for n in (5, 17) for model in ("base", "a1")}
    assert any(want[p, n, "base"] != want[p, n, "a1"] for p, n, _ in want)  # the adapter shows
    with thread_server(backend) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def complete(key):
            prompt, n, model = key
            r = client.completions.create(model=backend.registry.base_name if model == "base" else model,
                                          prompt=prompt, max_tokens=n, temperature=0)
            return r.choices[0].text
        # Rows join and leave the running batch at different steps, base and adapter mixed.
        with ThreadPoolExecutor(len(want)) as pool:
            got = dict(zip(want, pool.map(complete, want)))
        assert got == want
        # Unloading the last adapter keeps the layers the graph was traced through.
        assert httpx.delete(url + "/v1/adapters/a1").status_code == 200
        assert complete((PROMPTS[0], 17, "base")) == want[PROMPTS[0], 17, "base"]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompiling while serving


def test_compile_refuses_an_adapter_root_before_compiling(files, capsys):
    with pytest.raises(GraftError, match="--compile takes adapters at start only"):
        build_backend(files["model"], adapter_root=files["root"], compile=True)
    assert main(["serve", "--model", str(files["model"]), "--compile", "--adapter-root", str(files["root"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--adapter-root" in err and "compiling" not in err
