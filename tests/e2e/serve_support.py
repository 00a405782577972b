"""Shared set-up of the serving tests: a tiny model with a trained tokenizer, PEFT
adapters made by `peft`, and the real server on 127.0.0.1 (in a thread or a process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import SHARED_DATA, make_hf_model

ROOT = Path(__file__).resolve().parents[2]


def build_tiny_model(out: Path, context: int | None = None) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer (ChatML) saved beside it.

    `context` raises max_position_embeddings (RoPE extends to any length), for tests
    that need generations long enough to interrupt.
    """
    from graftlm.tokenizer import train_tokenizer
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:200_000]
    tok = train_tokenizer(iter(text.split("\n\n")), vocab_size=384)
    make_hf_model("llama", out, vocab_size=tok.vocab_size)
    tok.save(out)
    if context is not None:
        config = json.loads((out / "config.json").read_text())
        config["max_position_embeddings"] = context
        (out / "config.json").write_text(json.dumps(config))
    return out


def make_peft_adapter(model_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A PEFT-format LoRA adapter with random (non-zero) A and B, written by `peft`."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # make the adapter change greedy outputs visibly
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def thread_server(backend, api_key: str | None = None, **app_kwargs):
    """Serve `backend` with uvicorn in a thread of this process; yields the base URL."""
    import uvicorn

    from graftlm.serve import create_app
    app = create_app(backend, api_key=api_key, **app_kwargs)
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    backend.scheduler.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        backend.scheduler.stop()
        sock.close()


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server at {url} did not become healthy")


@contextmanager
def process_server(args: list[str], log: Path):
    """`graft serve ARGS` in a subprocess on a free port, output to `log`; yields (url, process)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    # One intra-op thread: on a shared 2-core machine, OpenMP threads that spin-wait for
    # each other make a tiny model's steps ~20x slower than one thread.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = open(log, "wb")  # a file, not a pipe: an unread pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "graftlm", "serve", "--port", str(port), *args],
                            env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()


def model_with_adapters(tmp: Path, context: int | None = None) -> dict:
    """{"model": dir, "root": adapter root holding a1, a2, a3} built once per test module."""
    model = build_tiny_model(tmp / "model", context)
    root = tmp / "adapters"
    for i, name in enumerate(("a1", "a2", "a3"), start=1):
        make_peft_adapter(model, root / name, seed=i)
    return {"model": model, "root": root}

