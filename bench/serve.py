"""Serving: 64 concurrent streaming requests over 4 LoRA adapters against the same 64
all sent to the base, through `graft serve` on loopback, in one run.

The base is the `30m` preset (random weights, a BPE tokenizer trained on
tinyshakespeare); four adapters of rank 16 on every linear layer are made with
graftlm.adapters and saved in PEFT format. Each request streams 32 greedy tokens. The
server runs in its own process with one intra-op thread (the CPU may be shared).
Printed: errors, total throughput of each run and their ratio (goal >= 0.8), and the
time to load an adapter, in process (`load_adapter`) and over HTTP (POST /v1/adapters).

    python bench/serve.py [--requests 64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def build(out: Path) -> tuple[Path, Path]:
    import torch
    from graftlm.adapters import AdapterConfig, apply_adapters, save_adapter, unload_adapter
    from graftlm.models.config import preset
    from graftlm.models.hf import save_model
    from graftlm.models.transformer import Decoder
    from graftlm.tokenizer import train_tokenizer
    cfg = preset("30m")
    text = DATA.read_text()
    tok = train_tokenizer(iter(text.split("\n\n")), vocab_size=cfg.vocab_size)
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = Decoder(cfg)
    model.init_weights()
    model_dir, root = out / "base", out / "adapters"
    save_model(model, model_dir)
    tok.save(model_dir)
    for i in range(4):
        apply_adapters(model, AdapterConfig(r=16, alpha=32, init="gaussian"), f"ad{i}")
        with torch.no_grad():  # a trained-looking adapter: B non-zero
            for name, p in model.named_parameters():
                if "lora_B" in name and f"ad{i}" in name:
                    p.normal_(0, 0.02)
        save_adapter(model, root / f"ad{i}", f"ad{i}")
        unload_adapter(model, f"ad{i}")
    print(f"base: {model.num_params() / 1e6:.1f}M parameters; adapters r=16 on all linear layers")
    return model_dir, root


def time_in_process_load(model_dir: Path, root: Path) -> float:
    from graftlm.adapters import load_adapter, unload_adapter
    from graftlm.models.hf import load_model
    model = load_model(model_dir)
    load_adapter(model, root / "ad0", "warm")
    unload_adapter(model, "warm")
    times = []
    for i in range(5):
        t = time.perf_counter()
        load_adapter(model, root / f"ad{i % 4}", f"x{i}")
        times.append(time.perf_counter() - t)
    return min(times)


async def one(client, model, prompt, tokens) -> tuple[int, bool]:
    got, ok = 0, False
    async with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            return 0, False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                ok = True
            elif line.startswith("data: "):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    got = usage["completion_tokens"]
    return got, ok


async def run(url, models, n, tokens) -> tuple[float, int, int]:
    prompts = [f"ROMEO {i}: what say you" for i in range(n)]
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=n + 4)) as client:
        t = time.perf_counter()
        results = await asyncio.gather(*(one(client, models[i % len(models)], prompts[i], tokens)
                                         for i in range(n)))
        wall = time.perf_counter() - t
    return wall, sum(g for g, _ in results), sum(not ok for _, ok in results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, root = build(Path(tmp))
        in_process = time_in_process_load(model_dir, root)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        log = open(Path(tmp) / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "graftlm", "serve", "--model", str(model_dir),
                                 "--adapter-root", str(root), "--port", str(port),
                                 "--max-batch", str(args.requests), "--max-queue", "1024"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            http_loads = []
            for i in range(4):
                t = time.perf_counter()
                r = httpx.post(url + "/v1/adapters", json={"name": f"ad{i}", "path": f"ad{i}"}, timeout=60)
                http_loads.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
            asyncio.run(run(url, ["base"], 8, 4))  # warm-up
            base = asyncio.run(run(url, ["base"], args.requests, args.tokens))
            mixed = asyncio.run(run(url, [f"ad{i}" for i in range(4)], args.requests, args.tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{'run':<28}{'wall s':>8}{'tokens':>8}{'tok/s':>9}{'errors':>8}")
    for name, (wall, toks, errs) in (("64 streams -> base", base), ("64 streams -> 4 adapters", mixed)):
        print(f"{name:<28}{wall:>8.2f}{toks:>8}{toks / wall:>9.1f}{errs:>8}")
    ratio = (mixed[1] / mixed[0]) / (base[1] / base[0])
    print(f"adapter / base throughput: {ratio:.2f}x (goal >= 0.8)")
    print(f"time to load a r=16 adapter: {in_process * 1e3:.1f} ms in process (best of 5), "
          f"{min(http_loads) * 1e3:.1f} ms over HTTP (best of 4) (goal < 100 ms)")


if __name__ == "__main__":
    main()
