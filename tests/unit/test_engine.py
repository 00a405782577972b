"""The generation engine: sampling, stops, streaming, the step API and the CLI."""

import io
import sys

import pytest
import torch

from graftlm.cli import main
from graftlm.engine import Batch, Engine, Request, SamplingParams
from graftlm.models.config import preset
from graftlm.models.hf import load_model, save_model
from graftlm.models.transformer import Decoder
from graftlm.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model saved with a byte-level BPE tokenizer trained on Shakespeare."""
    root = tmp_path_factory.mktemp("engine")
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:20000]
    tok = train_tokenizer(iter(text.split("\n\n")), vocab_size=400)
    tok.save(root / "tok")
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, tie_embeddings=False)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # untied and sharper than the init: varied text, not uniform noise
        model.lm_head.weight.mul_(4)
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(load_model(model_dir), load_tokenizer(model_dir))


PROMPTS = ["ROMEO: what light", "First Citizen:\nBefore we proceed any further, hear me"]


def _ids(completions):
    return [c.token_ids for c in completions]


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    sample = dict(max_new_tokens=24, temperature=1.0, stop_ids=())
    a = engine.generate(PROMPTS, SamplingParams(seed=1, **sample))
    b = engine.generate(PROMPTS, SamplingParams(seed=1, **sample))
    c = engine.generate(PROMPTS, SamplingParams(seed=2, **sample))
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    assert a[0].token_ids != a[1].token_ids  # one params object, rows still differ


def test_row_samples_do_not_depend_on_the_batch(engine):
    params = [SamplingParams(max_new_tokens=16, seed=7, stop_ids=()),
              SamplingParams(max_new_tokens=16, seed=9, stop_ids=(), top_p=0.9)]
    together = engine.generate(PROMPTS, params)
    assert together[0].token_ids == engine.generate(PROMPTS[:1], params[0])[0].token_ids
    assert together[1].token_ids == engine.generate(PROMPTS[1:], params[1])[0].token_ids


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20, temperature=0, stop_ids=()))
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20, temperature=1.5, top_k=1,
                                                   seed=3, stop_ids=()))
    assert _ids(greedy) == _ids(top1)


def test_top_k_and_top_p_restrict_the_candidates(engine):
    model = engine.model
    ids = engine.encode(PROMPTS[0])
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1]
    top3 = set(logits.topk(3).indices.tolist())
    for seed in range(8):
        out = engine.generate([ids], SamplingParams(max_new_tokens=1, top_k=3, seed=seed))
        assert out[0].token_ids[0] in top3
    probs = logits.softmax(-1)
    nucleus = set(probs.sort(descending=True).indices[:int((probs.sort(descending=True).values
                                                             .cumsum(0) < 0.5).sum()) + 1].tolist())
    for seed in range(8):
        out = engine.generate([ids], SamplingParams(max_new_tokens=1, top_p=0.5, seed=seed))
        assert out[0].token_ids[0] in nucleus


def test_stop_id_ends_generation(engine):
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=0, stop_ids=()))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 30 for c in free)
    stop_token = free[0].token_ids[6]
    first = free[0].token_ids.index(stop_token)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=0,
                                                  stop_ids=(stop_token,)))
    assert out[0].token_ids == free[0].token_ids[:first + 1]
    assert out[0].finish_reason == "stop"
    assert out[0].text == engine.tokenizer.decode(free[0].token_ids[:first])
    # The other row is unaffected by row 0 leaving the batch.
    second = free[1].token_ids
    assert out[1].token_ids == (second[:second.index(stop_token) + 1] if stop_token in second else second)


def test_stop_string_ends_generation_and_is_trimmed(engine):
    params = dict(max_new_tokens=40, seed=5, stop_ids=())
    full = engine.generate(PROMPTS[:1], SamplingParams(**params))[0]
    stop = next(full.text[i:i + 2] for i in range(8, len(full.text))
                if full.text[i:i + 2].isprintable() and "\ufffd" not in full.text[i:i + 2])
    out = engine.generate(PROMPTS[:1], SamplingParams(stop=(stop,), **params))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop)]
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)


def test_streaming_yields_the_same_tokens_and_text(engine):
    for params in (SamplingParams(max_new_tokens=25, temperature=0),
                   SamplingParams(max_new_tokens=25, seed=11, top_k=20, stop=("e",))):
        done = engine.generate(PROMPTS, params)
        tokens, texts, reasons = [[], []], ["", ""], [None, None]
        for events in engine.stream(PROMPTS, params):
            for e in events:
                assert reasons[e.key] is None  # nothing after a row's last event
                tokens[e.key].append(e.token_id)
                texts[e.key] += e.text
                reasons[e.key] = e.finish_reason
        assert tokens == _ids(done)
        assert texts == [c.text for c in done]
        assert reasons == [c.finish_reason for c in done]


def test_rows_join_and_leave_a_running_batch(engine):
    greedy = SamplingParams(max_new_tokens=20, temperature=0, stop_ids=())
    prompts = [engine.encode(p) for p in PROMPTS] + [engine.encode("KING: ")]
    alone = [engine.generate([p], greedy)[0].token_ids for p in prompts]
    batch, got = Batch(engine), {0: [], 1: [], 2: []}
    collect = lambda events: [got[e.key].append(e.token_id) for e in events]  # noqa: E731
    collect(batch.add([Request(prompts[0], greedy, key=0)]))
    for _ in range(5):
        collect(batch.step())
    collect(batch.add([Request(prompts[1], greedy, key=1), Request(prompts[2], greedy, key=2)]))
    collect(batch.step())
    batch.remove([2])  # a cancelled request
    while batch:
        collect(batch.step())
    assert got[0] == alone[0] and got[1] == alone[1]
    assert got[2] == alone[2][:len(got[2])] and len(got[2]) == 2


def test_one_new_token_finishes_at_prefill(engine):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=1, temperature=0, stop_ids=()))
    assert [len(c.token_ids) for c in out] == [1, 1]
    assert {c.finish_reason for c in out} == {"length"}


def test_bad_requests_are_one_line_errors(engine):
    from graftlm.errors import GraftError
    with pytest.raises(GraftError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(GraftError, match="empty"):
        engine.generate([[]])
    with pytest.raises(GraftError, match="token ids"):
        engine.generate([[10**6]])
    with pytest.raises(GraftError, match="stop strings need a tokenizer"):
        Engine(engine.model).generate([[5]], SamplingParams(stop=("x",)))


# -- the CLI --------------------------------------------------------------------------

def test_graft_generate_prints_completions(model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", PROMPTS[0], "--prompt", "KING:",
               "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("=== [") == 2 and "=== [1]" in out


def test_graft_generate_in_bfloat16_and_device_errors(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "6",
            "--temperature", "0"]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    bf16_text = capsys.readouterr().out
    engine = Engine(load_model(model_dir, dtype=torch.bfloat16), load_tokenizer(model_dir))
    assert engine.dtype == torch.bfloat16
    want = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, temperature=0))[0].text
    assert want in bf16_text
    for device, message in (("cuda:99", "--device cuda:99: "),  # no such device, with CUDA or without
                            ("tpu9", "--device: unknown device 'tpu9'")):
        assert main([*args, "--device", device]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_graft_chat_answers_a_line_then_exits_on_eof(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n"))
    rc = main(["chat", "--model", str(model_dir), "--system", "Be brief.",
               "--max-new-tokens", "6", "--seed", "0"])
    assert rc == 0
    engine = Engine(load_model(model_dir), load_tokenizer(model_dir))
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "hello there"}],
                                             add_generation_prompt=True))
    want = engine.generate([ids], SamplingParams(max_new_tokens=6, temperature=0.7, seed=0))[0]
    assert capsys.readouterr().out == want.text + "\n"


def test_graft_chat_commands_are_never_sent_to_the_model(model_dir, capsys, monkeypatch):
    # /help was sent to the model as a user turn; /reset did not exist.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/help\n/reset\n/nope x\nhello\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    # Two replies, the same: after /reset the same first turn gives the same greedy reply.
    assert out.count("\n") >= 2 and out == 2 * out[:len(out) // 2]
    assert err.splitlines() == ["/reset starts the conversation over, /exit or Ctrl-D ends it, /help shows this",
                                "(conversation cleared)",
                                "unknown command /nope: /reset starts the conversation over, /exit or Ctrl-D "
                                "ends it, /help shows this"]


def test_graft_generate_and_chat_with_an_adapter_on_the_base(model_dir, tmp_path, capsys, monkeypatch):
    import graftlm.adapters as A
    tuned = A.apply_adapters(load_model(model_dir), A.AdapterConfig(r=4))
    with torch.no_grad():
        for param in A.adapter_params(tuned):
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    A.save_adapter(tuned, tmp_path / "ad")
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    tok = load_tokenizer(model_dir)
    want = Engine(tuned.eval(), tok).generate([tok.encode(PROMPTS[0])], greedy)[0].text
    base = Engine(load_model(model_dir), tok).generate([tok.encode(PROMPTS[0])], greedy)[0].text
    assert want != base  # so that the adapter's text shows that it was used
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "ad"),
                 "--prompt", PROMPTS[0], "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n"))
    assert main(["chat", "--model", str(model_dir), "--adapter", str(tmp_path / "ad"), "--temperature", "0",
                 "--max-new-tokens", "4"]) == 0
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True))
    assert capsys.readouterr().out == Engine(tuned, tok).generate([ids], SamplingParams(
        max_new_tokens=4, temperature=0))[0].text + "\n"
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "ad"), "--compile",
                 "--prompt", "hi"]) == 2
    assert "graft merge" in capsys.readouterr().err
    # A second --adapter is refused, where it used to replace the first without a word.
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "ad"), "--adapter",
                 str(tmp_path / "other"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--adapter given 2 times" in err and "graft serve" in err


def test_missing_model_dir_exits_2_with_one_line(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nope" in err


def test_model_without_tokenizer_and_a_text_prompt_is_one_error(model_dir, tmp_path, capsys):
    save_model(load_model(model_dir), tmp_path / "bare")
    rc = main(["generate", "--model", str(tmp_path / "bare"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "tokenizer.json" in err


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_reward_model_is_refused_in_one_line_pointing_to_eval(model_dir, tmp_path, capsys, monkeypatch,
                                                              command):
    from graftlm.models.heads import ScalarHeadModel, save_scalar_model
    reward = ScalarHeadModel.from_decoder(load_model(model_dir), generator=torch.Generator().manual_seed(0))
    rm = save_scalar_model(reward, tmp_path / "rm", tokenizer_dir=model_dir)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    args = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, "--model", str(rm), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a reward model" in err and "graft eval" in err
    assert "lm_head" not in err


def test_generate_past_the_context_names_max_new_tokens(model_dir, capsys):
    context = load_model(model_dir).config.max_seq_len
    tok = load_tokenizer(model_dir)
    longest = len(tok.encode(PROMPTS[1], add_bos=tok.add_bos))
    args = ["generate", "--model", str(model_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    assert main([*args, "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-new-tokens 100000" in err
    assert f"context of {context} (at most {context - longest} new tokens fit)" in err
    # What fits is generated in full: no row stops at the context.
    assert main([*args, "--max-new-tokens", str(context - longest), "--temperature", "0"]) == 0
    assert "Traceback" not in capsys.readouterr().err
