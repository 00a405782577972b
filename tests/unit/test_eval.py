"""graft eval: text loss / bpb by hand, answers with a few-shot baseline, pairs, adapters side by side."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from graftlm.cli import main
from graftlm.eval import evaluate
from graftlm.models import Decoder, ModelConfig
from graftlm.models.hf import save_model
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from graftlm.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9 hello world"] * 10), 290)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=4, num_kv_heads=2, max_seq_len=128, pad_token_id=tok.pad_id,
                                bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    model.init_weights(torch.Generator().manual_seed(0))
    tok.save(root / "tok")
    save_model(model, root / "model", tokenizer_dir=root / "tok")
    return root


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_loss_and_bits_per_byte_by_hand(model_dir, tmp_path):
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import load_tokenizer
    data = _write(tmp_path / "text.jsonl", [{"text": "hello world 12"}, {"text": "copy: 3 4"}])
    got = evaluate(model_dir / "model", data)["metrics"]["base"]
    model, tok = load_model(model_dir / "model"), load_tokenizer(model_dir / "model")
    nll, tokens, n_bytes = 0.0, 0, 0
    for text in ("hello world 12", "copy: 3 4"):
        ids = torch.tensor([[tok.eos_id] + tok.encode(text)])  # scored after EOS: this tokenizer adds no BOS
        logp = torch.log_softmax(model(ids)[0, :-1], -1).gather(-1, ids[0, 1:, None])
        nll -= logp.sum().item()
        tokens += ids.shape[1] - 1
        n_bytes += len(text.encode())
    assert got["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert got["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)


def test_chat_rows_score_the_assistant_tokens_by_hand(model_dir, tmp_path, capsys):
    """Chat rows, what `graft sft` trains on, get the mean loss of their assistant tokens."""
    from graftlm.data.render import RenderConfig, Renderer
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import load_tokenizer
    chats = [{"messages": [{"role": "user", "content": f"copy: {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
             for i in range(5)]
    data = _write(tmp_path / "chats.jsonl", chats)
    got = evaluate(model_dir / "model", data, batch_size=2)
    model, tok = load_model(model_dir / "model"), load_tokenizer(model_dir / "model")
    renderer = Renderer(tok, RenderConfig(max_length=128))
    nll, tokens = 0.0, 0
    for chat in chats:  # one row at a time, no padding: log p of each trained token
        row = renderer.render({"messages": chat["messages"], "source": "x"})
        ids, mask = torch.tensor([row.input_ids]), torch.tensor(row.loss_mask[1:], dtype=torch.bool)
        logp = torch.log_softmax(model(ids)[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        nll -= logp[mask].sum().item()
        tokens += int(mask.sum())
    assert (got["kind"], got["rows"]) == ("chat", 5) and got["metrics"]["base"]["tokens"] == tokens
    assert got["metrics"]["base"]["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data)]) == 0
    assert "chat" in capsys.readouterr().out


def test_adapters_side_by_side_with_few_shot_baseline(model_dir, tmp_path, capsys):
    from graftlm.adapters import AdapterConfig, apply_adapters, save_adapter
    from graftlm.models.hf import load_model
    model = load_model(model_dir / "model")
    apply_adapters(model, AdapterConfig(r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    answers = _write(tmp_path / "answers.jsonl", [{"prompt": f"copy: {i} {i}", "answer": f"{i} {i}"} for i in range(6)])
    seen = []
    result = evaluate(model_dir / "model", answers, adapters={"tuned": str(tmp_path / "adapter")},
                      few_shot=2, max_new_tokens=4, batch_size=3, progress=lambda *done: seen.append(done))
    assert result["rows"] == 4 and set(result["metrics"]) == {"base", "tuned", "base+2-shot"}
    assert seen == [(name, done, 4) for name in ("base", "tuned", "base+2-shot") for done in (3, 4)]
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "copy: 1 2", "chosen": "1 2", "rejected": "2 1"},
                                             {"prompt": "copy: 3 4", "chosen": "3 4", "rejected": "4 3 3"}])
    assert main(["eval", "--model", str(model_dir / "model"), "--adapter", f"tuned={tmp_path / 'adapter'}",
                 "--data", str(pairs), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # The model's row is named by its directory, as graft serve names it.
    assert set(printed["metrics"]) == {"model", "tuned"} and printed["rows"] == 2
    for metrics in printed["metrics"].values():
        assert 0.0 <= metrics["logp_accuracy"] <= 1.0
    # A bare DIR, as `graft generate --adapter` takes it, is named by its run (or directory).
    run = tmp_path / "runs" / "lora"
    (run / "final").parent.mkdir(parents=True)
    (tmp_path / "adapter").rename(run / "final")
    (run / "summary.json").write_text("{}")
    assert main(["eval", "--model", str(model_dir / "model"), "--adapter", str(run / "final"),
                 "--data", str(pairs), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["metrics"]) == {"model", "lora"}


def test_bad_rows_are_one_line_errors(model_dir, tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"foo": 1}])
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["answers", "pairs", "text"])
@pytest.mark.parametrize("flag", ["--batch-size", "--max-rows"])
def test_batch_size_and_max_rows_below_one_name_the_flag(model_dir, tmp_path, capsys, kind, flag):
    rows = {"answers": [{"prompt": "copy: 1", "answer": "1"}],
            "pairs": [{"prompt": "copy: 1", "chosen": "1", "rejected": "2"}],
            "text": [{"text": "hello world"}]}[kind]
    data = _write(tmp_path / f"{kind}.jsonl", rows)
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data), flag, "0"]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: must be >= 1, got 0" in err and len(err.strip().splitlines()) == 1


def test_few_shot_taking_every_row_is_one_line_error(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "answers.jsonl", [{"prompt": f"copy: {i}", "answer": f"{i}"} for i in range(2)])
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data), "--few-shot", "2"]) == 2
    err = capsys.readouterr().err
    assert "no row left to score" in err and len(err.strip().splitlines()) == 1


def test_text_longer_than_the_context_is_scored_whole_in_windows(model_dir, tmp_path):
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import load_tokenizer
    text = " ".join(f"copy: {i % 10} hello world" for i in range(120))
    data = tmp_path / "corpus.txt"  # a plain text file is one row
    data.write_text(text)
    model, tok = load_model(model_dir / "model"), load_tokenizer(model_dir / "model")
    ids = [tok.eos_id] + tok.encode(text)
    assert len(ids) > 3 * model.config.max_seq_len
    got = evaluate(model_dir / "model", data, batch_size=2)
    assert got["rows"] == 1 and got["metrics"]["base"]["tokens"] == len(ids) - 1
    # By hand: windows of the context's length, each starting on the last one's last token.
    nll, step = 0.0, model.config.max_seq_len - 1
    for start in range(0, len(ids) - 1, step):
        window = torch.tensor([ids[start:start + model.config.max_seq_len]])
        logp = torch.log_softmax(model(window)[0, :-1], -1).gather(-1, window[0, 1:, None])
        nll -= logp.sum().item()
    assert got["metrics"]["base"]["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-4)
    assert got["metrics"]["base"]["bpb"] == pytest.approx(
        nll / math.log(2) / len(tok.decode(ids[1:]).encode()), rel=1e-4)


def test_a_skipped_bad_row_is_reported_beside_the_metrics(model_dir, tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"copy: {i % 10}"}) + "\n" for i in range(120)) + "not json\n")
    result = evaluate(model_dir / "model", data)
    assert (result["rows"], result["rows_in_data"], result["rows_left_out"]) == (120, 121, {"bad": 1})
    assert result["bad_rows_skipped"]["bad"] == 1 and "text.jsonl:121" in result["bad_rows_skipped"]["first"]
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "(text): 120 of 121 rows evaluated; left out: 1 bad\n" in out
    assert "first bad row: " in out and "text.jsonl:121" in out


# -- preference pairs: what each row's accuracy measures ------------------------------------

def _tuned_adapter(model_dir, out, kind="lora", std=0.5, seed=1):
    """An adapter of `kind` on the test model, its B matrices drawn at `std`, saved to `out`."""
    from graftlm.adapters import AdapterConfig, apply_adapters, save_adapter
    from graftlm.models.hf import load_model
    model = load_model(model_dir / "model")
    torch.manual_seed(seed)  # A's initialisation: the same adapter whichever tests ran before
    apply_adapters(model, AdapterConfig(kind=kind, r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(seed))
    save_adapter(model, out)
    return model


def _completion_logps(model, renderer, rows, mean: bool = False):
    """Summed (`mean`: mean per token) log p of the chosen and of the rejected completion,
    one pair at a time, no padding."""
    out = []
    for row in rows:
        pair = renderer.render_pair({**row, "source": "x"})
        logps = []
        for ids, mask in ((pair.chosen_ids, pair.chosen_mask), (pair.rejected_ids, pair.rejected_mask)):
            x = torch.tensor([pair.prompt_ids + ids])
            logp = torch.log_softmax(model(x)[0, :-1].float(), -1).gather(-1, x[0, 1:, None])[:, 0]
            scored = logp[len(pair.prompt_ids) - 1:][torch.tensor(mask)]
            logps.append((scored.mean() if mean else scored.sum()).item())
        out.append(logps)
    return torch.tensor(out)


PAIRS = [{"prompt": f"copy: {i} {j}", "chosen": f"{i} {j}", "rejected": f"{j} {i} {i}"}
         for i, j in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 0), (2, 7))]


def test_pairs_report_log_prob_and_implicit_reward_accuracy_under_their_own_names(model_dir, tmp_path, capsys):
    """The model's row compared plain log-probs and the adapters' rows implicit DPO rewards,
    both printed as `pairwise_accuracy`: each is now reported under its own name, by hand."""
    from graftlm.adapters import set_active_adapter
    from graftlm.data.render import RenderConfig, Renderer
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import load_tokenizer
    tuned = _tuned_adapter(model_dir, tmp_path / "adapter")
    torch.manual_seed(1)  # a reference other than the model: another initialisation
    ref_model = Decoder(load_model(model_dir / "model").config)
    ref_model.init_weights(torch.Generator().manual_seed(1))
    save_model(ref_model, tmp_path / "ref", tokenizer_dir=model_dir / "tok")
    data = _write(tmp_path / "pairs.jsonl", PAIRS)

    renderer = Renderer(load_tokenizer(model_dir / "model"), RenderConfig(max_length=128))
    base, ref = load_model(model_dir / "model"), load_model(tmp_path / "ref")
    set_active_adapter(tuned, "default")
    with torch.no_grad():
        own, adapted, reference = (_completion_logps(m, renderer, PAIRS) for m in (base, tuned, ref))
        own_mean, adapted_mean = (_completion_logps(m, renderer, PAIRS, mean=True) for m in (base, tuned))
    margin = {k: v[:, 0] - v[:, 1] for k, v in (("own", own), ("adapted", adapted), ("ref", reference),
                                                 ("own_mean", own_mean), ("adapted_mean", adapted_mean))}
    want = {"model": {"logp_accuracy": (margin["own"] > 0).float().mean().item(),
                      "avg_logp_accuracy": (margin["own_mean"] > 0).float().mean().item(),
                      "reward_accuracy": (margin["own"] - margin["ref"] > 0).float().mean().item()},
            "tuned": {"logp_accuracy": (margin["adapted"] > 0).float().mean().item(),
                      "avg_logp_accuracy": (margin["adapted_mean"] > 0).float().mean().item(),
                      "reward_accuracy": (margin["adapted"] - margin["own"] > 0).float().mean().item()}}
    # The measures disagree on these pairs: one name for two hid which was meant. The
    # rejected completions are longer, so the summed log-prob favours the chosen ones more
    # than the per-token mean (SimPO's score) does.
    assert want["tuned"]["logp_accuracy"] != want["tuned"]["reward_accuracy"]
    assert want["model"]["logp_accuracy"] != want["model"]["avg_logp_accuracy"]

    result = evaluate(model_dir / "model", data, adapters={"tuned": str(tmp_path / "adapter")},
                      reference=tmp_path / "ref", name="model", batch_size=3)
    assert result["metrics"].keys() == want.keys()
    for row, metrics in want.items():
        assert result["metrics"][row] == pytest.approx(metrics, abs=1e-6)
    assert "ref" in result["definitions"]["reward_accuracy"]
    # Without a reference the model's own row has no implicit reward: no value in that column.
    assert main(["eval", "--model", str(model_dir / "model"), "--adapter", f"tuned={tmp_path / 'adapter'}",
                 "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "pairwise_accuracy" not in out and "│ model " in out
    table = {line.split()[1]: line.split()[3:-1:2] for line in out.splitlines() if line.startswith("│ ")}
    cells = {row: [f"{m['avg_logp_accuracy']:.4f}", f"{m['logp_accuracy']:.4f}", f"{m['reward_accuracy']:.4f}"]
             for row, m in want.items()}
    assert table == {"model": cells["model"][:2] + ["-"], "tuned": cells["tuned"]}
    for name in ("logp_accuracy", "avg_logp_accuracy", "reward_accuracy"):
        assert f"\n{name}: " in out  # each column says what it measures


def test_a_qlora_adapter_beside_others_changes_no_other_row(model_dir, tmp_path):
    """Loading a QLoRA adapter quantizes its base to NF4 in place: loaded beside a LoRA
    adapter onto one model, it moved the LoRA row and the model's own row onto the 4-bit
    weights. Every row now scores as it does alone, and the QLoRA adapter's implicit
    reward is measured against its own 4-bit base without adapters (QLoRA-DPO's
    reference), by hand."""
    from graftlm.adapters import disable_adapters
    from graftlm.data.render import RenderConfig, Renderer
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import load_tokenizer
    _tuned_adapter(model_dir, tmp_path / "lora")
    quantized = _tuned_adapter(model_dir, tmp_path / "qlora", kind="qlora", std=0.001, seed=4)
    lora, qlora = str(tmp_path / "lora"), str(tmp_path / "qlora")
    text = _write(tmp_path / "text.jsonl", [{"text": "hello world 12"}, {"text": "copy: 3 4 5 6"}])
    pairs = _write(tmp_path / "pairs.jsonl", PAIRS)
    for data in (text, pairs):
        alone = {**evaluate(model_dir / "model", data, adapters={"lora": lora})["metrics"],
                 **evaluate(model_dir / "model", data, adapters={"qlora": qlora})["metrics"]}
        for adapters in ({"qlora": qlora, "lora": lora}, {"lora": lora, "qlora": qlora}):
            assert evaluate(model_dir / "model", data, adapters=adapters)["metrics"] == alone

    renderer = Renderer(load_tokenizer(model_dir / "model"), RenderConfig(max_length=128))
    with torch.no_grad():
        adapted = _completion_logps(quantized, renderer, PAIRS)
        full_base = _completion_logps(load_model(model_dir / "model"), renderer, PAIRS)
        with disable_adapters(quantized):
            quantized_base = _completion_logps(quantized, renderer, PAIRS)

    def reward_accuracy(reference):
        return ((adapted[:, 0] - adapted[:, 1]) - (reference[:, 0] - reference[:, 1]) > 0).float().mean().item()

    # The adapter is small beside NF4's rounding of the base: against the full-precision
    # base its implicit reward would measure the rounding.
    assert reward_accuracy(quantized_base) != reward_accuracy(full_base)
    result = evaluate(model_dir / "model", pairs, adapters={"lora": lora, "qlora": qlora})
    assert result["metrics"]["qlora"]["reward_accuracy"] == pytest.approx(reward_accuracy(quantized_base))
    assert "quantized to 4 bits (NF4), without adapters, for qlora" in result["definitions"]["reward_accuracy"]


def test_a_full_fine_tune_is_named_by_its_run_not_base(model_dir, tmp_path, capsys):
    run = tmp_path / "runs" / "sft"
    run.mkdir(parents=True)
    shutil.copytree(model_dir / "model", run / "final")
    (run / "summary.json").write_text("{}")
    answers = _write(tmp_path / "answers.jsonl", [{"prompt": f"copy: {i}", "answer": f"{i}"} for i in range(4)])
    assert main(["eval", "--model", str(run / "final"), "--data", str(answers), "--few-shot", "1",
                 "--max-new-tokens", "2", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["metrics"]) == ["sft", "sft+1-shot"]
    pairs = _write(tmp_path / "pairs.jsonl", PAIRS[:2])
    assert main(["eval", "--model", str(run / "final"), "--data", str(pairs)]) == 0
    out = capsys.readouterr().out
    assert "│ sft " in out and "base" not in out
    # An adapter may not take the model's name: the rows would be one.
    _tuned_adapter(model_dir, tmp_path / "sft")
    assert main(["eval", "--model", str(run / "final"), "--adapter", str(tmp_path / "sft"), "--data", str(pairs)]) == 2
    assert "not the model's, 'sft'" in capsys.readouterr().err


# -- every row of the data is accounted for ------------------------------------------------

def _accounted(result) -> bool:
    return result["rows"] + sum(result["rows_left_out"].values()) == result["rows_in_data"]


def test_pairs_too_long_for_the_context_are_counted_in_the_heading(model_dir, tmp_path, capsys):
    long_prompt = "copy: " + " ".join(["1 2 3 hello world"] * 60)  # fills the 128-token context
    rows = PAIRS[:3] + [{"prompt": long_prompt, "chosen": "1", "rejected": "2"}] + PAIRS[3:6]
    data = _write(tmp_path / "pairs.jsonl", rows)
    result = evaluate(model_dir / "model", data, max_rows=6)
    assert (result["rows"], result["rows_in_data"]) == (5, 7)
    assert result["rows_left_out"] == {"past_max_rows": 1, "too_long": 1} and _accounted(result)
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data), "--max-rows", "6"]) == 0
    heading = capsys.readouterr().out.splitlines()[0]
    assert heading.endswith("(pairs): 5 of 7 rows evaluated; left out: 1 past --max-rows, "
                            "1 too long for the 128-token context")


def test_chats_cut_at_the_context_and_answers_used_as_shots_are_counted(model_dir, tmp_path, capsys):
    long = " ".join(["hello world"] * 80)
    chats = [{"messages": [{"role": "user", "content": "copy: 1"}, {"role": "assistant", "content": "1 1"}]},
             {"messages": [{"role": "user", "content": "copy: 2"}, {"role": "assistant", "content": long}]},
             {"messages": [{"role": "user", "content": long + long}, {"role": "assistant", "content": "3"}]}]
    result = evaluate(model_dir / "model", _write(tmp_path / "chats.jsonl", chats))
    # The second row's reply is cut at the context; the third's prompt fills it: too long.
    assert (result["rows"], result["rows_in_data"], result["rows_cut"]) == (2, 3, 1)
    assert result["rows_left_out"] == {"too_long": 1} and _accounted(result)
    answers = _write(tmp_path / "answers.jsonl", [{"prompt": f"copy: {i}", "answer": f"{i}"} for i in range(6)])
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(answers), "--few-shot", "2",
                 "--max-rows", "3", "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["rows"], result["rows_in_data"]) == (3, 6) and _accounted(result)
    assert result["rows_left_out"] == {"few_shot_examples": 2, "past_max_rows": 1}


def test_readme_names_the_metrics_eval_reports(model_dir, tmp_path):
    """README said "accuracy" where eval printed `exact_match`: it names each reported metric."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    answers = _write(tmp_path / "answers.jsonl", [{"prompt": f"copy: {i}", "answer": f"{i}"} for i in range(2)])
    _tuned_adapter(model_dir, tmp_path / "adapter")
    reported = set()
    for data in (answers, _write(tmp_path / "pairs.jsonl", PAIRS[:2]),
                 _write(tmp_path / "text.jsonl", [{"text": "hello world"}])):
        result = evaluate(model_dir / "model", data, adapters={"a": str(tmp_path / "adapter")}, max_new_tokens=2)
        reported |= {metric for metrics in result["metrics"].values() for metric in metrics}
    assert {"exact_match", "logp_accuracy", "reward_accuracy", "loss", "bpb"} <= reported
    assert [m for m in sorted(reported) if f"`{m}`" not in readme] == []


def test_a_reward_model_is_named_by_its_run_and_its_rows_accounted_for(model_dir, tmp_path, capsys):
    from graftlm.data.render import RenderConfig, Renderer
    from graftlm.models.heads import ScalarHeadModel, load_scalar_model, save_scalar_model
    from graftlm.models.hf import load_model
    from graftlm.objectives.dpo import PreferencePairs
    from graftlm.objectives.reward import pair_scores
    from graftlm.tokenizer import load_tokenizer
    run = tmp_path / "runs" / "rm"
    scorer = ScalarHeadModel.from_decoder(load_model(model_dir / "model"), generator=torch.Generator().manual_seed(0))
    save_scalar_model(scorer, run / "final", tokenizer_dir=model_dir / "tok")
    (run / "summary.json").write_text("{}")
    long_prompt = "copy: " + " ".join(["1 2 3 hello world"] * 60)
    data = _write(tmp_path / "pairs.jsonl", PAIRS[:4] + [{"prompt": long_prompt, "chosen": "1", "rejected": "2"}])
    assert main(["eval", "--model", str(run / "final"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["rows"], result["rows_in_data"], result["rows_left_out"]) == (4, 5, {"too_long": 1})
    # By hand: the scores of each pair alone.
    scorer, renderer = load_scalar_model(run / "final"), Renderer(load_tokenizer(run / "final"), RenderConfig(128))
    wins = []
    with torch.no_grad():
        for row in PAIRS[:4]:
            pairs = PreferencePairs([renderer.render_pair({**row, "source": "x"})], scorer.pad_token_id)
            chosen, rejected = pair_scores(scorer, pairs.collate([pairs[0]]))
            wins.append(float(chosen.item() > rejected.item()))
    assert result["metrics"] == {"rm": {"pairwise_accuracy": pytest.approx(sum(wins) / 4)}}


# -- bad rows, the kind of data, and the options ---------------------------------------------

def _diverging_transcripts():
    """An HH-RLHF row whose two transcripts do not share the conversation (9 such bad rows
    are in its harmless test split): a bad preference row."""
    return {"chosen": "\n\nHuman: copy: 1\n\nAssistant: 1", "rejected": "\n\nHuman: copy: 2\n\nAssistant: 2"}


def test_one_bad_row_of_a_small_held_out_file_is_skipped_not_fatal(model_dir, tmp_path, capsys):
    """One bad row of 40 (2.5%) stopped eval at the training commands' 1% bound, and
    --max-bad-fraction was unknown: it is skipped, counted and named; a file mostly bad stops."""
    rows = [PAIRS[i % len(PAIRS)] for i in range(36)] + [_diverging_transcripts()] + PAIRS[:3]
    data = _write(tmp_path / "hh_test40.jsonl", rows)
    model = str(model_dir / "model")
    assert main(["eval", "--model", model, "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "(pairs): 39 of 40 rows evaluated; left out: 1 bad\n" in out
    assert "first bad row: " in out and "hh_test40.jsonl:37: fields 'chosen' and 'rejected' do not share" in out
    # --max-bad-fraction sets the bound, and its error names the flag and the first bad row.
    assert main(["eval", "--model", model, "--data", str(data), "--max-bad-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert "1 of 40 rows are bad" in err and "hh_test40.jsonl:37" in err and "--max-bad-fraction" in err
    assert main(["eval", "--model", model, "--data", str(data), "--max-bad-fraction", "0.03"]) == 0
    capsys.readouterr()
    # A file where most rows are bad (the wrong file, or the wrong kind) is still an error.
    mostly_bad = _write(tmp_path / "mostly_bad.jsonl", PAIRS[:2] + [_diverging_transcripts()] * 3)
    assert main(["eval", "--model", model, "--data", str(mostly_bad)]) == 2
    err = capsys.readouterr().err
    assert "3 of 5 rows are bad" in err and "mostly_bad.jsonl:3" in err and len(err.strip().splitlines()) == 1


def test_an_answer_row_without_an_answer_is_a_bad_row_not_an_error(model_dir, tmp_path):
    rows = [{"prompt": f"copy: {i}", "answer": f"{i}"} for i in range(4)] + [{"prompt": "copy: 9"}]
    result = evaluate(model_dir / "model", _write(tmp_path / "answers.jsonl", rows), max_new_tokens=2)
    assert (result["rows"], result["rows_left_out"]) == (4, {"bad": 1}) and _accounted(result)
    assert "answers.jsonl:5: " in result["bad_rows_skipped"]["first"] and "'answer'" in result["bad_rows_skipped"]["first"]


def test_prompt_completion_rows_can_be_scored_for_their_held_out_loss(model_dir, tmp_path, capsys):
    """prompt/completion rows were always scored as greedy answers: `--as chat` scores the
    loss of their completions, as `graft sft` trains on them, the same as the messages rows."""
    pc = [{"prompt": f"copy: {i} {i}", "completion": f"{i} {i}"} for i in range(5)]
    messages = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
                for r in pc]
    pc_data = _write(tmp_path / "pc.jsonl", pc)
    want = evaluate(model_dir / "model", _write(tmp_path / "chats.jsonl", messages))
    assert evaluate(model_dir / "model", pc_data, max_new_tokens=2)["kind"] == "answers"  # the default stays
    got = evaluate(model_dir / "model", pc_data, kind="chat")
    assert got["kind"] == "chat" and got["metrics"] == want["metrics"] and got["rows"] == 5
    # GSM8K's question / answer rows too, from the command line.
    rows = [json.loads(line) for line in (SHARED_DATA / "gsm8k_test.jsonl").read_text().splitlines()]
    gsm8k = _write(tmp_path / "gsm8k.jsonl", sorted(rows, key=lambda r: len(r["question"]))[:3])  # fit 128 tokens
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(gsm8k), "--as", "chat", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "chat" and result["rows"] == 3 and result["metrics"]["model"]["tokens"] > 0
    # Rows whose fields do not allow the kind: one line naming what they can be scored as.
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(pc_data), "--as", "pairs"]) == 2
    err = capsys.readouterr().err
    assert "pc.jsonl:1: rows with fields 'completion', 'prompt' cannot be scored as pairs" in err
    assert "they can be as answers or chat" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["pairs", "text"])
def test_few_shot_on_pairs_or_text_says_which_kinds_it_applies_to(model_dir, tmp_path, capsys, kind):
    """--few-shot with rows it cannot apply to was silently ignored: no +K-shot row, no word."""
    rows = {"pairs": PAIRS[:2], "text": [{"text": "hello world"}]}[kind]
    data = _write(tmp_path / f"{kind}.jsonl", rows)
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data), "--few-shot", "1"]) == 2
    err = capsys.readouterr().err
    assert "--few-shot: applies to answers (examples in the prompt) and chat rows (examples as turns" in err
    assert f"these rows are scored as {kind}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["chat", "pairs", "text"])
def test_the_heading_names_the_kind_as_the_as_flag_takes_it(model_dir, tmp_path, capsys, kind):
    """The heading said "(preference)" where `--as` calls the kind `pairs`."""
    rows = {"chat": [{"messages": [{"role": "user", "content": "copy: 1"}, {"role": "assistant", "content": "1"}]}],
            "pairs": PAIRS[:2], "text": [{"text": "hello world"}]}[kind]
    data, model = str(_write(tmp_path / f"{kind}.jsonl", rows)), str(model_dir / "model")
    assert main(["eval", "--model", model, "--data", data]) == 0
    assert f" on {data} ({kind}): " in capsys.readouterr().out.splitlines()[0]
    assert main(["eval", "--model", model, "--data", data, "--as", kind, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == kind


def test_every_option_of_eval_help_says_what_it_does_and_its_default():
    import argparse

    from graftlm.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for action in sub.choices["eval"]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag_only = isinstance(action, argparse._StoreTrueAction)  # off unless given
        if not action.help or not (action.required or flag_only or "default" in action.help):
            missing.append(action.option_strings[0])
    assert missing == []


def test_a_numeric_answer_cut_at_max_new_tokens_scores_only_with_a_finished_marker(monkeypatch):
    """As GRPO's gsm8k reward: '... is 18' cut at the token limit may have been '... is 180'."""
    from types import SimpleNamespace

    import graftlm.engine
    from graftlm.evaluation.answers import score_answers
    answers = [("so it is 18", "length"), ("so it is 18", "stop"), ("#### 18 and", "length")]

    class FakeEngine:
        def __init__(self, model, tokenizer):
            pass

        def generate(self, ids, params):
            return [SimpleNamespace(text=text, finish_reason=why) for text, why in answers[:len(ids)]]

    monkeypatch.setattr(graftlm.engine, "Engine", FakeEngine)
    rows = [{"prompt": "q", "answer": "18"}] * 3
    metrics = score_answers(None, None, rows, [[1]] * 3, max_new_tokens=4, reward=None, batch_size=8)
    assert metrics["exact_match"] == pytest.approx(2 / 3)
