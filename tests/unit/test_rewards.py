"""Verifiable rewards, user reward functions and their errors, on real GSM8K rows."""

from __future__ import annotations

import json

import pytest

from graftlm.errors import ConfigError, GraftError
from graftlm.rewards import (RewardPolicy, RewardScorer, build_reward, build_rewards, exact_match, final_number,
                             numeric_match, reward_names)
from tests.conftest import SHARED_DATA


def _gsm8k_rows(n=None):
    with open(SHARED_DATA / "gsm8k_test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return rows[:n] if n else rows


def test_final_number_on_every_gsm8k_test_answer():
    rows = _gsm8k_rows()
    for row in rows:
        written = row["answer"].rsplit("####", 1)[1].strip()
        assert final_number(row["answer"]) == written.replace(",", ""), row["answer"][-40:]
    # The first rows, checked by hand: 18, 3, 70000 (written "70,000" in the reasoning).
    assert [final_number(r["answer"]) for r in rows[:3]] == ["18", "3", "70000"]


@pytest.mark.parametrize("text,want", [
    ("The answer is 1,234.", "1234"), ("so $18.00 in total", "18"), ("-7 degrees", "-7"),
    ("#### 42\nThen 7 more", "42"), ("0.50 dollars", "0.5"), ("no number here", None),
    ("3 apples and 4 pears, 7 fruits", "7"),
])
def test_final_number_normalises(text, want):
    assert final_number(text) == want


def test_numeric_match_on_gsm8k_rows():
    rows = _gsm8k_rows(3)
    completions = ["She makes 9 * 2 = 18 dollars.\n#### 18", "It takes 3 bolts", "The profit is $70,000."]
    assert numeric_match(completions, [r["question"] for r in rows], rows) == [1.0, 1.0, 1.0]
    wrong = ["#### 19", "2 bolts", "70,001"]
    assert numeric_match(wrong, [""] * 3, rows) == [0.0, 0.0, 0.0]


def test_exact_and_regex_rewards():
    rows = [{"answer": "olleh"}, {"answer": "abc"}]
    assert exact_match([" olleh\n", "abd"], ["", ""], rows) == [1.0, 0.0]
    fmt = build_reward(r"regex:^<answer>\d+</answer>$")
    assert fmt(["<answer>12</answer>", "12"], ["", ""], rows) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="invalid regular expression"):
        build_reward("regex:(")


def _write_module(tmp_path, body):
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return path


def test_user_function_gets_completion_prompt_and_extra_fields(tmp_path):
    path = _write_module(tmp_path, "def score(completion, prompt, answer):\n"
                                   "    return float(completion == answer) + 0.5 * (prompt == 'p')\n")
    reward = build_reward(f"{path}:score")
    rows = [{"prompt": "p", "answer": "x", "unused": 1}, {"prompt": "q", "answer": "y"}]
    assert reward(["x", "x"], ["p", "q"], rows) == [1.5, 0.0]


def test_user_function_error_names_file_line_and_prompt(tmp_path):
    path = _write_module(tmp_path, "def score(completion, prompt, **row):\n"
                                   "    raise ValueError('boom')\n")
    reward = build_reward(f"{path}:score")
    with pytest.raises(GraftError) as e:
        reward(["c"], ["What is 2+2?"], [{"source": "data.jsonl:7"}])
    msg = str(e.value)
    assert "ValueError: boom" in msg and f"{path}:2" in msg and "What is 2+2?" in msg and "data.jsonl:7" in msg


def test_user_function_non_number_is_an_error_naming_the_prompt(tmp_path):
    path = _write_module(tmp_path, "def score(completion, prompt):\n    return 'high'\n")
    with pytest.raises(GraftError, match=r"returned 'high'.*prompt 'Reverse abc'"):
        build_reward(f"{path}:score")(["c"], ["Reverse abc"], [{}])


def test_module_function_from_working_directory(tmp_path, monkeypatch):
    _write_module(tmp_path, "def length(completion, prompt):\n    return len(completion)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_reward("my_rewards:length")(["abcd"], ["p"], [{}]) == [4.0]
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        build_reward("my_rewards:missing")


def test_skip_policy_counts_and_stops_when_too_many_are_bad(tmp_path):
    path = _write_module(tmp_path, "def score(completion, prompt):\n"
                                   "    if completion == 'bad':\n        raise ValueError('bad')\n    return 1.0\n")
    scorer = RewardScorer(build_reward(f"{path}:score"), RewardPolicy(on_error="skip", max_bad_fraction=0.25))
    assert scorer(["ok", "bad", "ok", "ok"], ["a", "b", "c", "d"], [{}] * 4) == [1.0, None, 1.0, 1.0]
    assert (scorer.scored, scorer.skipped) == (4, 1)
    scorer(["ok"] * 28, ["p"] * 28, [{}] * 28)  # 1 bad of 32: fine
    with pytest.raises(GraftError, match=r"failed to score, more than --grpo\.reward-errors\.max-bad-fraction 0\.25"):
        scorer(["bad"] * 12, ["p"] * 12, [{}] * 12)
    only_bad = RewardScorer(build_reward(f"{path}:score"), RewardPolicy(on_error="skip"))
    with pytest.raises(GraftError, match="no valid reward left"):
        only_bad(["bad", "bad"], ["a", "b"], [{}, {}])
    strict = RewardScorer(build_reward(f"{path}:score"))
    with pytest.raises(GraftError, match="prompt 'b'"):
        strict(["ok", "bad"], ["a", "b"], [{}, {}])


def test_unknown_reward_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="expected gsm8k"):
        build_reward("nonsense")


def test_several_rewards_are_a_weighted_sum_over_those_that_apply(tmp_path):
    """TRL's list of reward functions: a function returns None where it does not apply
    (a data set mixing tasks); each completion's score is the weighted sum of the rest,
    and a completion no reward applies to is counted as unscored."""
    path = _write_module(tmp_path, "def math_only(completion, prompt, task):\n"
                                   "    return None if task != 'math' else float('4' in completion)\n")
    rewards = build_rewards(["regex:^<a>", f"{path}:math_only"], [0.5, 2.0])
    assert [r.name for r in rewards] == ["regex", "math_only"]
    scorer = RewardScorer(rewards, RewardPolicy(on_error="raise"))
    rows = [{"task": "math"}, {"task": "math"}, {"task": "chat"}, {"task": "chat"}]
    assert scorer(["<a>4", "5", "<a>hi", "hi"], ["p"] * 4, rows) == [2.5, 0.0, 0.5, 0.0]
    assert scorer.last_parts == {"regex": [1.0, 0.0, 1.0, 0.0], "math_only": [1.0, 0.0, None, None]}
    # No reward applies: 0, as TRL's sum of NaNs gives, and said; never a failure that stops the run.
    alone = RewardScorer(build_rewards([f"{path}:math_only"]))
    assert alone(["4", "4"], ["p", "q"], [{"task": "math"}, {"task": "chat"}]) == [1.0, 0.0]
    assert alone.last_none_applied == [False, True] and alone.skipped == 0
    assert alone(["x"] * 40, ["p"] * 40, [{"task": "chat"}] * 40) == [0.0] * 40
    with pytest.raises(ConfigError, match=r"'reward_weights': 1 weight for 2 rewards"):
        build_rewards(["gsm8k", "exact"], [1.0])
    assert reward_names(["gsm8k", "regex:a", "regex:b", "m:f", str(tmp_path)]) == \
        ["gsm8k", "regex", "regex_2", "f", tmp_path.name]


def test_the_share_no_reward_applied_to_is_logged():
    import torch

    from graftlm.objectives.rollout import Rollout, rollout_metrics
    rollout = Rollout(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.bool),
                      torch.tensor([1.0, 0.0, 0.0, 0.0]), ["a"] * 4, 2, 0.0, 0.0, torch.full((4,), 3),
                      torch.zeros(4, dtype=torch.bool), none_applied=torch.tensor([False, False, True, True]))
    assert rollout_metrics(rollout)["reward/none_applied"] == 0.5
    rollout.none_applied = torch.zeros(4, dtype=torch.bool)
    assert "reward/none_applied" not in rollout_metrics(rollout)
