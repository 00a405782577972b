"""Fixtures of the OpenAI-client tests (test_serve_api.py, test_serve_client_fixes.py):
per module, a tiny model, the server in a thread with adapter "a1" and --adapter-root,
and an `openai` client. A module that defines its own `files` or `server` uses those."""

import pytest

from serve_support import model_with_adapters, thread_server


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return model_with_adapters(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(files):
    from graftlm.serve import build_backend
    backend = build_backend(files["model"], {"a1": str(files["root"] / "a1")},
                            adapter_root=files["root"], max_batch=8)
    with thread_server(backend) as url:
        yield url, backend


@pytest.fixture
def client(server):
    import openai
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
