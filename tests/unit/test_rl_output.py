"""What RL runs report and reward: PPO's whole loss with its value part, TRL-style
(batched) reward functions, and gsm8k's rule for completions cut at max_new_tokens."""

from __future__ import annotations

import json

import pytest
import torch

from graftlm.errors import GraftError
from graftlm.objectives.ppo import PPOConfig, PPOObjective
from graftlm.objectives.rollout import SamplingConfig
from graftlm.rewards import RewardPolicy, RewardScorer, build_reward, numeric_match
from tests.unit.rl_support import CopyPrompts, length_reward, policy, prompt_batch


# -- 1. PPO's reported loss ----------------------------------------------------------------

def test_ppo_loss_is_policy_plus_value_loss_and_only_the_policy_part_has_gradient(tokenizer):
    model = policy(tokenizer)
    cfg = PPOConfig(reward="unused", sampling=SamplingConfig(group_size=2, max_new_tokens=4))
    objective = PPOObjective(cfg, tokenizer, model, reward=length_reward)
    total, count, metrics = objective.loss(model, prompt_batch(tokenizer))
    n = count.item()
    assert n > 0 and metrics["value_loss"] > 0
    # Whitened advantages at the first pass: the policy part is ~0, the whole loss is not.
    assert abs(metrics["policy_loss"]) < 1e-4
    assert total.item() / n == pytest.approx(metrics["policy_loss"] + metrics["value_loss"], rel=1e-5)
    # The value part is a constant to the policy: the gradient is the policy loss's.
    grads = torch.autograd.grad(total, [p for p in model.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    # Without grad (no critic step) the sum is the policy's alone.
    with torch.no_grad():
        total, count, metrics = objective.loss(model, prompt_batch(tokenizer))
    assert "value_loss" not in metrics
    assert total.item() == pytest.approx(metrics["policy_loss"] * count.clamp_min(1).item(), abs=1e-6)


def test_progress_line_shows_the_value_loss_beside_the_loss(tmp_path, capsys):
    from graftlm.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, 2, tensorboard=False, log_every=1)
    logger.log({"step": 1, "loss": 0.0130, "lr": 1e-5, "tokens_per_s": 100.0, "mfu": 0.01,
                "train_value_loss": 0.0129, "train_reward/mean": 0.25, "train_kl": 0.001})
    logger.close()
    assert "loss 0.0130  vf 0.0129  reward 0.250  kl 0.001  100 tok/s" in capsys.readouterr().out


def test_ppo_run_reports_its_whole_loss(tokenizer, tmp_path, capsys):
    from graftlm.data.loader import ResumableLoader
    from graftlm.optim import OptimConfig
    from graftlm.trainer import TrainConfig, Trainer

    model = policy(tokenizer)
    cfg = PPOConfig(reward="unused", sampling=SamplingConfig(group_size=1, max_new_tokens=3))
    train = TrainConfig(max_steps=2, batch_size=2, precision="fp32", eval_every=0, save_every=0)
    trainer = Trainer(model, PPOObjective(cfg, tokenizer, model, reward=length_reward),
                      ResumableLoader(CopyPrompts(tokenizer, 4), 2), train, OptimConfig(warmup_steps=0),
                      device=torch.device("cpu"), run_dir=tmp_path, tensorboard=False)
    trainer.fit()
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if "loss" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        assert r["loss"] == pytest.approx(r["train_policy_loss"] + r["train_value_loss"], rel=1e-4, abs=1e-7)
        assert r["loss"] > 1e-4
    last = train_rows[-1]  # printed: the last step (log_every 10)
    assert f"loss {last['loss']:.4f}  vf {last['train_value_loss']:.4f}" in out
    assert trainer.stats()["final_train_loss"] == train_rows[-1]["loss"]


# -- 2. TRL-style (batched) reward functions -------------------------------------------------

def _module(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return f"{path}:score"


def test_trl_style_function_is_called_once_per_batch_with_columns(tmp_path, monkeypatch):
    import sys

    _module(tmp_path, "graft_test_trl_reward",
                   "calls = []\n"
                   "def score(prompts, completions, answer, **kwargs):\n"
                   "    calls.append((prompts, completions, answer, sorted(kwargs)))\n"
                   "    return [float(c == a) for c, a in zip(completions, answer)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = build_reward("graft_test_trl_reward:score")
    rows = [{"answer": "1", "level": 2, "source": "a:1"}, {"answer": "3", "level": 5, "source": "a:2"}]
    assert fn(["1", "2"], ["p1", "p2"], rows) == [1.0, 0.0]
    # One call, lists in; `source` is graftlm's, not a column.
    assert sys.modules["graft_test_trl_reward"].calls == [(["p1", "p2"], ["1", "2"], ["1", "3"], ["level"])]


def test_trl_style_function_without_prompts_or_only_kwargs(tmp_path):
    only = build_reward(_module(tmp_path, "trl_only", "def score(completions):\n"
                                                      "    return [len(c) for c in completions]\n"))
    assert only(["ab", "c"], ["p", "q"], [{}, {}]) == [2.0, 1.0]
    kwargs = build_reward(_module(tmp_path, "trl_kwargs", "def score(**kwargs):\n"
                                                          "    return [len(kwargs['prompts'][0])] * 2\n"))
    assert kwargs(["a", "b"], ["xyz", "q"], [{}, {}]) == [3.0, 3.0]


def test_trl_style_function_of_the_wrong_length_is_one_clear_line(tmp_path):
    fn = build_reward(_module(tmp_path, "trl_short", "def score(prompts, completions, **kw):\n"
                                                     "    return [0.0] * 200\n"))
    with pytest.raises(GraftError) as error:
        fn(["a", "b"], ["p", "q"], [{}, {}])
    message = str(error.value)
    assert "\n" not in message and len(message.replace(str(tmp_path), "")) < 400, message
    assert "trl_short.py:score returned [0.0, 0.0" in message and "(200 items) for 2 completions" in message
    assert "fn(prompts=[...], completions=[...], **columns)" in message
    bad = build_reward(_module(tmp_path, "trl_nan", "def score(prompts, completions):\n"
                                                   "    return [float('nan') if c == 'b' else 1.0 for c in completions]\n"))
    with pytest.raises(GraftError, match=r"returned nan \(float, not a finite number or None\) in its list, "
                                         r"for a completion of prompt 'q'"):
        bad(["a", "b"], ["p", "q"], [{}, {}])
    # The skip policy scores one completion at a time: only the NaN is skipped.
    scorer = RewardScorer(bad, RewardPolicy(on_error="skip", max_bad_fraction=0.5))
    assert scorer(["a", "b"], ["p", "q"], [{}, {}]) == [1.0, None]
    # None is TRL's "does not apply": no error (the scorer then scores the completion 0).
    na = build_reward(_module(tmp_path, "trl_none", "def score(prompts, completions):\n"
                                                   "    return [None if c == 'b' else 1.0 for c in completions]\n"))
    assert na(["a", "b"], ["p", "q"], [{}, {}]) == [1.0, None]


def test_per_completion_function_returning_a_list_names_the_signature(tmp_path):
    # TRL's body with graftlm's per-completion parameter names: called per completion.
    fn = build_reward(_module(tmp_path, "looks_trl", "def score(prompt_list, completion_list, **kw):\n"
                                                     "    return [0.0 for _ in completion_list]\n"))
    with pytest.raises(GraftError) as error:
        fn(["a completion"], ["Reverse abc"], [{}])
    message = str(error.value)
    assert "\n" not in message and len(message.replace(str(tmp_path), "")) < 400, message
    # It got the prompt as `completion_list`: one item per character, shortened.
    assert "returned [0.0, 0.0," in message and "(11 items)" in message and "(list, not a finite number or None) on prompt 'Reverse abc'" in message
    assert "once per completion as fn(completion, prompt, **row_fields) -> float" in message
    assert "must name its parameter 'completions'" in message


# -- 3. gsm8k and cut completions ------------------------------------------------------------

def test_numeric_match_does_not_score_a_cut_completion_without_a_finished_marked_answer():
    rows = [{"answer": "#### 18"}] * 5
    completions = ["She has 3 eggs... 18",          # cut: the last number is where the cut fell
                   "so 9 * 2 = 18 #### 18\nQuestion",  # cut after a finished #### answer
                   "#### 18",                        # cut right after the marker's number (it may go on: 180)
                   "<000000018",                     # gibberish
                   "She has 3 eggs... 18"]           # ended by the model: its last number counts
    truncated = [True, True, True, True, False]
    assert numeric_match(completions, [""] * 5, rows, truncated=truncated) == [0.0, 1.0, 0.0, 0.0, 1.0]
    # Without the flag (eval): as before, every completion counts as ended.
    assert numeric_match(completions, [""] * 5, rows) == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_scorer_passes_truncated_only_to_rewards_that_take_it():
    seen = []

    def takes(completions, prompts, rows, truncated=None):
        seen.append(truncated)
        return [1.0] * len(completions)

    RewardScorer(takes)(["a", "b"], ["p", "q"], [{}, {}], truncated=[True, False])
    RewardScorer(length_reward)(["a", "b"], ["p", "q"], [{}, {}], truncated=[True, False])
    assert seen == [[True, False]]
    assert RewardScorer(build_reward("gsm8k"))(["x 18", "x 18"], ["p", "q"], [{"answer": "18"}] * 2,
                                               truncated=[True, False]) == [0.0, 1.0]


def test_rollout_tells_gsm8k_which_completions_were_cut(tokenizer, monkeypatch):
    import graftlm.engine
    from graftlm.engine import Completion
    from graftlm.objectives.rollout import RolloutSampler

    class Engine:
        def __init__(self, model, tokenizer):
            pass

        def generate(self, prompts, params):
            eos = tokenizer.eos_id
            return [Completion([5, eos], "18", "stop", 3), Completion([5, 6, 7], "18", "length", 3)]

    monkeypatch.setattr(graftlm.engine, "Engine", Engine)
    sampler = RolloutSampler(SamplingConfig(group_size=2, max_new_tokens=3), RewardScorer(build_reward("gsm8k")),
                             tokenizer)
    batch = {"prompt_ids": [tokenizer.encode("copy: 1")], "prompts": ["copy: 1"], "rows": [{"answer": "18"}]}
    rollout = sampler.sample(policy(tokenizer), batch, tokenizer.pad_id)
    assert rollout.rewards.tolist() == [1.0, 0.0] and rollout.truncated.tolist() == [False, True]
