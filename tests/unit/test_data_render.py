"""Rendering: assistant-only masks found by prefix rendering, EOS learned, length policies."""

import pytest

from graftlm.data.render import RenderConfig, Renderer
from graftlm.tokenizer import BOS, EOS, IM_END, PAD, Tokenizer, train_tokenizer
from tests.conftest import SHARED_DATA

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello, my lord."}, {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "No more!"}]


@pytest.fixture(scope="module")
def tok():
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:100_000]
    return train_tokenizer(iter([text]), 400)


def trained_text(tok, row):
    """Decoded runs of trained tokens."""
    runs, current = [], []
    for i, m in zip(row.input_ids, row.loss_mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tok.decode(current, skip_special_tokens=False))
    return runs


def test_only_assistant_turns_and_their_end_of_turn_are_trained(tok):
    row = Renderer(tok).render({"messages": CHAT, "source": "f:1"})
    assert tok.decode(row.input_ids, skip_special_tokens=False) == tok.apply_chat_template(CHAT)
    assert trained_text(tok, row) == [f"Hello, my lord.{IM_END}\n", f"No more!{IM_END}\n"]
    assert row.input_ids == tok.encode(tok.apply_chat_template(CHAT))  # one tokenization of the whole text


def test_train_on_all_tokens(tok):
    row = Renderer(tok, RenderConfig(train_on="all")).render({"messages": CHAT})
    assert all(row.loss_mask)


def test_prompt_completion_is_a_user_and_an_assistant_turn(tok):
    row = Renderer(tok).render({"prompt": "2+2?", "completion": "four"})
    assert trained_text(tok, row) == [f"four{IM_END}\n"]
    assert tok.decode(row.input_ids, skip_special_tokens=False).startswith("<|im_start|>user\n2+2?")


def test_without_a_chat_template_prompt_completion_is_raw_text_plus_eos():
    # A "base model" tokenizer: no chat template and no ChatML tokens.
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:50_000]
    trained = train_tokenizer(iter([text]), 300, special_tokens=[PAD, BOS, EOS])
    base = Tokenizer(backend=trained.backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, add_bos=True)
    renderer = Renderer(base)
    row = renderer.render({"prompt": "Question: 2+2? Answer:", "completion": " four"})
    assert base.decode(row.input_ids, skip_special_tokens=False) == f"{BOS}Question: 2+2? Answer: four{EOS}"
    assert trained_text(base, row) == [f" four{EOS}"]
    pair = renderer.render_pair({"prompt": "Q:", "chosen": " yes", "rejected": " no"})
    assert base.decode(pair.prompt_ids, skip_special_tokens=False) == f"{BOS}Q:"
    assert base.decode(pair.chosen_ids, skip_special_tokens=False) == f" yes{EOS}"


def test_text_rows_train_everything_and_end_with_eos(tok):
    row = Renderer(tok).render({"text": "To be, or not to be"})
    assert row.input_ids[-1] == tok.eos_id and all(row.loss_mask)


def test_truncate_keeps_the_start_and_counts(tok):
    renderer = Renderer(tok, RenderConfig(max_length=40, overflow="truncate"))
    full = Renderer(tok).render({"messages": CHAT})
    row = renderer.render({"messages": CHAT})
    assert row.truncated and row.input_ids == full.input_ids[:40] and row.loss_mask == full.loss_mask[:40]
    assert renderer.counts.truncated == 1 and renderer.counts.dropped_too_long == 0


def test_drop_policy_and_untrained_rows_are_counted(tok):
    renderer = Renderer(tok, RenderConfig(max_length=40, overflow="drop"))
    assert renderer.render({"messages": CHAT}) is None
    assert renderer.render({"prompt": "Hi", "completion": "Yo"}) is not None
    assert renderer.counts.dropped_too_long == 1
    # A long prompt that fills max_length leaves nothing to train: lost to the limit, counted
    # once (it was counted as cut and as untrained: "128 of 100 rows were cut or dropped").
    truncating = Renderer(tok, RenderConfig(max_length=20))
    assert truncating.render({"prompt": "word " * 50, "completion": "x"}) is None
    assert (truncating.counts.dropped_too_long, truncating.counts.truncated, truncating.counts.dropped_untrained) \
        == (1, 0, 0)


def test_preference_pair_prompt_plus_completions(tok):
    example = {"prompt": [{"role": "user", "content": "Hi"}],
               "chosen": [{"role": "assistant", "content": "Good day."}],
               "rejected": [{"role": "assistant", "content": "Go away."}]}
    pair = Renderer(tok).render_pair(example)
    prompt_text = tok.apply_chat_template(example["prompt"], add_generation_prompt=True)
    assert tok.decode(pair.prompt_ids, skip_special_tokens=False) == prompt_text
    assert tok.decode(pair.chosen_ids, skip_special_tokens=False) == f"Good day.{IM_END}\n"
    assert tok.decode(pair.rejected_ids, skip_special_tokens=False) == f"Go away.{IM_END}\n"
    assert all(pair.chosen_mask) and all(pair.rejected_mask)
    assert pair.prompt_ids + pair.chosen_ids == tok.encode(tok.apply_chat_template(example["prompt"] + example["chosen"]))


def test_preference_pair_carries_its_margin(tok):
    renderer = Renderer(tok)
    assert renderer.render_pair({"prompt": "Hi", "chosen": "yes", "rejected": "no", "margin": 1.5}).margin == 1.5
    assert renderer.render_pair({"prompt": "Hi", "chosen": "yes", "rejected": "no"}).margin == 0.0


def test_preference_truncation_keeps_the_prompt(tok):
    example = {"prompt": "Hi", "chosen": "word " * 30, "rejected": "no"}
    renderer = Renderer(tok, RenderConfig(max_length=20))
    pair = renderer.render_pair(example)
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 20 and pair.truncated
    assert renderer.counts.truncated == 1


def test_rl_prompt_ends_with_the_generation_prompt(tok):
    ids = Renderer(tok).render_prompt({"prompt": "2+2?", "extra": {}})
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
