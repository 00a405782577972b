"""Row validation per objective: every bad-row kind names file:line and its field."""

import json

import pytest

from graftlm.data.formats import RowCounts, iter_examples, load_examples
from graftlm.errors import GraftError
from tests.conftest import SHARED_DATA


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]}


@pytest.mark.parametrize("objective, bad_row, message", [
    ("sft", {"messages": [{"role": "robot", "content": "x"}]}, "'messages\\[0\\].role': unknown role 'robot'"),
    ("sft", {"messages": [{"role": "user"}]}, "'messages\\[0\\].content' must be a string"),
    ("sft", {"prompt": "Q", "completion": ""}, "field 'completion' is empty"),
    ("sft", {"prompt": "Q"}, "missing field 'completion'"),
    ("sft", {"foo": 1}, "missing fields: expected 'messages'"),
    ("sft", {"question": "Q", "answr": "A"}, "or 'text' \\(the row has 'question', 'answr'\\)"),
    ("dpo", {"prompt": "Q", "chosen": "A", "rejected": "A"}, "'chosen' and 'rejected' are equal"),
    ("dpo", {"prompt": "Q", "chosen": "A"}, "missing field 'rejected'"),
    ("dpo", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
     "do not share the conversation"),
    ("dpo", {"chosen": "no transcript", "rejected": "other"}, "'chosen' is not a"),
    ("grpo", {"answer": "4"}, "missing field 'prompt'"),
    ("text", {"body": "x"}, "missing field 'text' \\(the row has 'body'\\)"),
    ("sft", "{broken json", "invalid JSON"),
    ("reward", {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "1.5"}, "field 'margin' must be a finite "),
    ("reward", {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": True}, "field 'margin' must be a finite "),
    ("reward", '{"prompt": "Q", "chosen": "A", "rejected": "B", "margin": NaN}', "field 'margin' .* got nan"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, objective, bad_row, message):
    good = {"sft": GOOD_CHAT, "dpo": {"prompt": "Q", "chosen": "A", "rejected": "B"},
            "reward": {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 1},
            "grpo": {"prompt": "Q"}, "text": {"text": "t"}}[objective]
    path = jsonl(tmp_path, [good, good, bad_row])
    with pytest.raises(GraftError, match=message) as info:
        list(iter_examples(path, objective, errors="raise"))
    assert f"{path}:3:" in str(info.value)


def test_skipped_rows_are_counted_and_reported(tmp_path):
    rows = [GOOD_CHAT] * 98 + [{"prompt": "Q", "completion": ""}, "{oops"]
    path = jsonl(tmp_path, rows)
    examples, counts = load_examples(path, "sft", max_bad_fraction=0.05)
    assert (len(examples), counts.rows, counts.bad) == (98, 100, 2)
    assert counts.errors[0].startswith(f"{path}:99: field 'completion'")
    assert counts.errors[1].startswith(f"{path}:100: invalid JSON")


def test_run_stops_when_too_many_rows_are_bad(tmp_path):
    path = jsonl(tmp_path, [GOOD_CHAT] * 9 + [{"prompt": "Q", "completion": ""}])
    with pytest.raises(GraftError, match=r"1 of 10 rows are bad \(10.0% > max_bad_fraction 5.0%\); first: .*d.jsonl:10"):
        load_examples(path, "sft", max_bad_fraction=0.05)
    assert len(load_examples(path, "sft", max_bad_fraction=0.2)[0]) == 9


def test_run_stops_early_on_a_stream_of_bad_rows(tmp_path):
    path = jsonl(tmp_path, [{"text": "x"}] * 1500)  # pre-training text given to SFT... fine; to DPO: bad
    counts = RowCounts()
    with pytest.raises(GraftError, match="rows are bad"):
        list(iter_examples(path, "dpo", max_bad_fraction=0.5, counts=counts))
    assert counts.rows == 1000  # stopped as soon as the early check could tell


def test_nothing_valid_left_is_an_error(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "Q", "completion": ""}])
    with pytest.raises(GraftError, match="no valid row for objective 'sft'.*d.jsonl:1"):
        load_examples(path, "sft", max_bad_fraction=1.0)


def test_sft_shapes_normalise(tmp_path):
    path = jsonl(tmp_path, [
        GOOD_CHAT,
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]},
        {"question": "Q?", "answer": "A\n#### 1"},
        {"text": "plain"},
    ])
    examples, _ = load_examples(path, "sft")
    assert examples[0]["messages"] == GOOD_CHAT["messages"]
    assert examples[1] == {"prompt": "2+2?", "completion": "4", "source": f"{path}:2"}
    assert examples[2]["messages"][1] == {"role": "assistant", "content": "Yo"}
    assert (examples[3]["prompt"], examples[3]["completion"]) == ("Q?", "A\n#### 1")
    assert examples[4]["text"] == "plain"


def test_preferences_with_strings_lists_and_mixed(tmp_path):
    path = jsonl(tmp_path, [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
    ])
    a, b, c = load_examples(path, "dpo")[0]
    assert (a["prompt"], a["chosen"], a["rejected"]) == ("Q", "good", "bad")
    for ex in (b, c):
        assert ex["prompt"] == [{"role": "user", "content": "Q"}]
        assert ex["chosen"] == [{"role": "assistant", "content": "good"}]
        assert ex["rejected"] == [{"role": "assistant", "content": "bad"}]


def test_a_pair_keeps_its_margin(tmp_path):
    # TRL's optional margin column, for the reward model; a missing or null one is no margin.
    hh = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path = jsonl(tmp_path, [{"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 2},
                            {**hh, "margin": -0.5}, {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": None}])
    examples, counts = load_examples(path, "reward")
    assert counts.bad == 0 and [e.get("margin") for e in examples] == [2.0, -0.5, None]
    assert isinstance(examples[0]["margin"], float)


def test_hh_rlhf_prompt_is_the_shared_prefix_on_real_rows():
    path = SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz"
    examples, counts = load_examples(path, "dpo")
    assert counts.rows == 2312 and counts.bad == 9  # 4 empty answers, 5 diverging transcripts
    assert all("empty completion" in e or "do not share" in e for e in counts.errors)
    first = examples[0]
    assert first["source"] == f"{path}:1"
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert first["chosen"][0]["content"].startswith("No, sorry!  All of these involve a pen")
    assert first["rejected"][0]["content"].startswith("There are lots of funny things")
    for ex in examples:  # the prompt ends on a user turn; each side is one assistant turn
        assert ex["prompt"][-1]["role"] == "user" and len(ex["chosen"]) == len(ex["rejected"]) == 1
        assert ex["chosen"] != ex["rejected"]


def test_gsm8k_rows_for_sft_and_rl():
    path = SHARED_DATA / "gsm8k_test.jsonl"
    rl, counts = load_examples(path, "grpo")
    assert counts.rows == 1319 and counts.bad == 0
    assert rl[0]["prompt"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert rl[0]["extra"]["answer"].endswith("#### 18") and rl[0]["extra"]["final_answer"] == "18"
    assert all(ex["extra"]["final_answer"].lstrip("-").replace(".", "").isdigit() for ex in rl)
    sft, _ = load_examples(path, "sft")
    assert sft[0]["prompt"] == rl[0]["prompt"] and sft[0]["completion"] == rl[0]["extra"]["answer"]


def test_rl_extra_fields_go_to_the_reward(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "Say hi", "target": "hi", "answer": "x #### 1,234"}])
    (ex,), _ = load_examples(path, "grpo")
    assert ex["extra"] == {"target": "hi", "answer": "x #### 1,234", "final_answer": "1234"}


def test_text_field_option_and_txt_files(tmp_path):
    path = jsonl(tmp_path, [{"content": "doc one"}])
    (tmp_path / "b.txt").write_text("whole file")
    examples, _ = load_examples([path, tmp_path / "b.txt"], "text", text_field="content")
    assert [e["text"] for e in examples] == ["doc one", "whole file"]


def test_a_txt_file_given_to_sft_is_refused_naming_what_to_use(tmp_path):
    """A .txt file is one document: as one sft row it would train on its first
    max_length tokens only (and repeat them); refused, naming the file and the way."""
    path = tmp_path / "book.txt"
    path.write_text("a long book " * 1000)
    with pytest.raises(GraftError, match=r"book\.txt: a \.txt file is one document, and sft trains on rows.*"
                                          r"graft prepare` \+ `graft pretrain"):
        load_examples([path], "sft")
