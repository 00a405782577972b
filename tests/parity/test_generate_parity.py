"""Greedy generation against transformers' `generate`, family by family (CPU float32)."""

import pytest
import torch

from graftlm.engine import Engine, SamplingParams
from graftlm.models.hf import load_model
from tests.conftest import FAMILIES, make_hf_model

EOS = 2  # tests.conftest.hf_config


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (7, 19, 12)]


def _hf_greedy(hf, prompt, new_tokens):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False)[0, len(prompt):].tolist()
    # transformers pads after EOS; graftlm returns the ids up to and including it.
    return out[:out.index(EOS) + 1] if EOS in out else out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_generate(family, tmp_path):
    hf = make_hf_model(family, tmp_path / "hf")
    engine = Engine(load_model(tmp_path / "hf"))
    greedy = SamplingParams(max_new_tokens=32, temperature=0)
    prompts = _prompts()
    batched = engine.generate(prompts, greedy)  # left padded: lengths 7, 19, 12
    for prompt, completion in zip(prompts, batched):
        want = _hf_greedy(hf, prompt, 32)
        assert completion.token_ids == want
        assert completion.finish_reason == ("stop" if want[-1] == EOS else "length")
        alone = engine.generate([prompt], greedy)[0]
        assert alone.token_ids == completion.token_ids


def test_sliding_window_is_exceeded_and_still_matches(tmp_path):
    # Mistral's window is 24 in the tiny config; 19 + 32 tokens cross it.
    hf = make_hf_model("mistral", tmp_path / "hf")
    engine = Engine(load_model(tmp_path / "hf"))
    prompt = _prompts()[1]
    got = engine.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0, stop_ids=()))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                           do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
    # Neither side stops on EOS, so all 40 tokens (positions 19..58) are compared.
    assert got[0].token_ids == want and got[0].finish_reason == "length"
