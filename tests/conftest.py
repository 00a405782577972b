"""Shared fixtures: tiny Hugging Face models of each supported family, built locally."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Nothing a test run writes lands outside temporary directories: the measured peak
# FLOP/s cache (XDG_CACHE_HOME), Hypothesis' example database and constants. One
# directory per session, shared by xdist workers and the processes tests start.
if "GRAFTLM_TEST_HOME" not in os.environ:
    os.environ["GRAFTLM_TEST_HOME"] = tempfile.mkdtemp(prefix="graftlm-tests-")
    atexit.register(shutil.rmtree, os.environ["GRAFTLM_TEST_HOME"], ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.path.join(os.environ["GRAFTLM_TEST_HOME"], "cache")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(os.environ["GRAFTLM_TEST_HOME"], "hypothesis")
# Two xdist workers, and the processes their tests start, share this machine's cores:
# OpenMP threads that spin while they wait take the cores the other worker computes on.
# Sleeping instead cut a quick demo beside two compiling tests from 168 s to 142 s (and
# the CPU time spent from 268 s to 194 s) on 2 cores. Read when torch loads libgomp, so
# set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests never reach a hub; transformers must not try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

FAMILIES = {
    "llama": dict(),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   rope_theta=500000.0),
    "tinyllama": dict(num_key_value_heads=1),
    "smollm2": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=24),
    "qwen2": dict(),
    "qwen3": dict(head_dim=24),
}


def hf_config(family: str, vocab_size: int = 256):
    import transformers
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    common.update(FAMILIES[family])
    rope = {}
    if "rope_scaling" in common:
        rope = {"rope_parameters": {**common.pop("rope_scaling"), "rope_theta": common.pop("rope_theta")}}
    cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}.get(family, transformers.LlamaConfig)
    return cls(**common, **rope)


def make_hf_model(family: str, path: Path, vocab_size: int = 256, seed: int = 0):
    """A tiny random `transformers` model of `family`, saved to `path`; returns the model."""
    import transformers
    torch.manual_seed(seed)
    cfg = hf_config(family, vocab_size)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random norms and biases too, so that a swapped or ignored tensor shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture
def tiny_hf_dir(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    return tmp_path / "hf"
