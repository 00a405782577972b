"""`graft eval --few-shot K` on chat rows: the first K rows' turns before each
conversation, as context that is not scored."""

from __future__ import annotations

import json

import pytest
import torch

from graftlm.cli import main
from graftlm.eval import evaluate
from tests.unit.test_eval import _accounted, _write, model_dir  # noqa: F401  (model_dir: the shared fixture)


# -- few-shot chat rows: the examples as turns before each conversation, not scored ------------

def _turn(role, content):
    return {"role": role, "content": content}


def _chat(i, reply=None):
    return {"messages": [_turn("user", f"copy: {i}"), _turn("assistant", reply or f"{i} {i}")]}


def _hand_chat_loss(model_dir, conversations, max_length=128) -> tuple[float, int]:
    """(mean loss, tokens) of the assistant turns from index `scored_from` on of each
    (messages, scored_from), rendered by hand as ChatML (the test tokenizer's template),
    one conversation at a time, cut at `max_length`."""
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import load_tokenizer
    model, tok = load_model(model_dir / "model"), load_tokenizer(model_dir / "model")
    nll, tokens = 0.0, 0
    for messages, scored_from in conversations:
        text, spans = "", []
        for i, message in enumerate(messages):
            text += f"<|im_start|>{message['role']}\n"
            start = len(text)
            text += f"{message['content']}<|im_end|>\n"
            if message["role"] == "assistant" and i >= scored_from:
                spans.append((start, len(text)))  # the reply and its end of turn
        encoding = tok.backend.encode(text, add_special_tokens=False)
        ids = encoding.ids[:max_length]
        mask = torch.tensor([any(s <= start < e for s, e in spans) for start, _ in encoding.offsets[1:max_length]])
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        nll -= logp[mask].sum().item()
        tokens += int(mask.sum())
    return nll / tokens, tokens


def test_few_shot_chat_rows_score_their_own_turns_after_the_examples_by_hand(model_dir, tmp_path, capsys):
    """--few-shot K was refused for chat rows: the first K rows' user and assistant turns
    now go before each conversation (after its system message; the examples' own system
    message left out), and only the row's own assistant turns are scored."""
    shots = [{"messages": [_turn("system", "be brief"), *_chat(7)["messages"]]}, _chat(8)]
    scored = [{"messages": [_turn("system", "copy twice"), *_chat(1)["messages"]]},
              {"messages": _chat(2)["messages"] + _chat(3)["messages"]},  # two replies, both scored
              _chat(4)]
    data = _write(tmp_path / "chats.jsonl", shots + scored)
    result = evaluate(model_dir / "model", data, few_shot=2, batch_size=2)
    assert list(result["metrics"]) == ["base", "base+2-shot"]
    assert (result["rows"], result["rows_left_out"]) == (3, {"few_shot_examples": 2}) and _accounted(result)
    assert "few_shot_prompts_cut" not in result and "rows_cut" not in result
    examples = shots[0]["messages"][1:] + shots[1]["messages"]
    with_examples = [(scored[0]["messages"][:1] + examples + scored[0]["messages"][1:], 5),
                     (examples + scored[1]["messages"], 4), (examples + scored[2]["messages"], 4)]
    loss, tokens = _hand_chat_loss(model_dir, with_examples)
    zero_shot_loss, zero_shot_tokens = _hand_chat_loss(model_dir, [(row["messages"], 0) for row in scored])
    assert result["metrics"]["base"] == {"loss": pytest.approx(zero_shot_loss, rel=1e-5), "tokens": zero_shot_tokens}
    assert result["metrics"]["base+2-shot"] == {"loss": pytest.approx(loss, rel=1e-5), "tokens": tokens}
    # The same tokens scored; the examples change their loss, by far more than the tolerance above.
    assert tokens == zero_shot_tokens and abs(loss - zero_shot_loss) > 1e-3
    assert "base+2-shot: of the same tokens, after the user and assistant turns" in result["definitions"]["loss"]
    # Prompt/completion rows scored as chat take theirs as one user and one assistant turn.
    pc = [{"prompt": f"copy: {i}", "completion": f"{i} {i}"} for i in range(5)]
    got = evaluate(model_dir / "model", _write(tmp_path / "pc.jsonl", pc), kind="chat", few_shot=2)
    want = evaluate(model_dir / "model", _write(tmp_path / "messages.jsonl", [_chat(i) for i in range(5)]), few_shot=2)
    assert got["metrics"] == want["metrics"] and got["rows"] == 3
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data), "--few-shot", "2", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["metrics"]) == ["model", "model+2-shot"]


def test_few_shot_chat_examples_cut_to_fit_the_context_are_counted(model_dir, tmp_path, capsys):
    """A conversation that does not fit after all the examples loses the first ones; one
    that fits none is scored as without them (cut as SFT cuts it): each is counted."""
    def hello(n):
        return " ".join(["hello world"] * n)  # 2 tokens each; a chat row is about 25 tokens more

    shots = [_chat(7, hello(5)), _chat(8, hello(5))]  # about 35 tokens each
    rows = [_chat(1),  # fits after both examples
            _chat(2, hello(20)),  # fits after the last example only
            _chat(3, hello(40)),  # fits alone only
            _chat(4, hello(60))]  # too long alone: cut at the context, with or without examples
    data = _write(tmp_path / "chats.jsonl", shots + rows)
    result = evaluate(model_dir / "model", data, few_shot=2)
    assert (result["rows"], result["rows_cut"], result["few_shot_prompts_cut"]) == (4, 1, 3) and _accounted(result)
    kept = [(shots[0]["messages"] + shots[1]["messages"] + rows[0]["messages"], 4),
            (shots[1]["messages"] + rows[1]["messages"], 2), (rows[2]["messages"], 0), (rows[3]["messages"], 0)]
    loss, tokens = _hand_chat_loss(model_dir, kept)
    assert result["metrics"]["base+2-shot"] == {"loss": pytest.approx(loss, rel=1e-5), "tokens": tokens}
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data), "--few-shot", "2"]) == 0
    heading = capsys.readouterr().out.splitlines()[0]
    assert heading.endswith("(chat): 4 of 6 rows evaluated; left out: 2 used as few-shot examples; 1 cut to fit the "
                            "128-token context (their start kept); 3 few-shot prompts cut to fit (their first "
                            "examples lost)")


def test_few_shot_chat_rows_refuse_what_has_no_turns(model_dir, tmp_path, capsys, monkeypatch):
    """A text row among chat rows has no turns; a tokenizer without a chat template scores
    prompt/completion rows as raw text, where examples as turns would change the format too."""
    model = str(model_dir / "model")
    data = _write(tmp_path / "chats.jsonl", [_chat(1), _chat(2), {"text": "hello world"}])
    assert main(["eval", "--model", model, "--data", str(data), "--few-shot", "1"]) == 2
    err = capsys.readouterr().err
    assert "chats.jsonl:3: --few-shot: a text row among chat rows has no turns" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setattr("graftlm.data.render.has_chat_template", lambda tokenizer: False)
    assert main(["eval", "--model", model, "--data", str(data), "--few-shot", "1"]) == 2
    err = capsys.readouterr().err
    assert "--few-shot: chat rows take their examples as chat turns, and the tokenizer of " in err
    assert "has no chat template" in err and len(err.strip().splitlines()) == 1
