"""graft eval: text loss / bpb by hand, answers with a few-shot baseline, pairs, adapters side by side."""

from __future__ import annotations

import json
import math

import pytest
import torch

from graftlm.cli import main
from graftlm.eval import evaluate
from graftlm.models import Decoder, ModelConfig
from graftlm.models.hf import save_model


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
        ids = torch.tensor([tok.encode(text, add_bos=True)])
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
    assert set(printed["metrics"]) == {"base", "tuned"} and printed["rows"] == 2
    for metrics in printed["metrics"].values():
        assert 0.0 <= metrics["pairwise_accuracy"] <= 1.0
    # A bare DIR, as `graft generate --adapter` takes it, is named by its run (or directory).
    run = tmp_path / "runs" / "lora"
    (run / "final").parent.mkdir(parents=True)
    (tmp_path / "adapter").rename(run / "final")
    (run / "summary.json").write_text("{}")
    assert main(["eval", "--model", str(model_dir / "model"), "--adapter", str(run / "final"),
                 "--data", str(pairs), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["metrics"]) == {"base", "lora"}


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
    ids = tok.encode(text, add_bos=True)
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
    assert result["rows"] == 120
    assert result["bad_rows_skipped"]["bad"] == 1 and "text.jsonl:121" in result["bad_rows_skipped"]["first"]
    assert main(["eval", "--model", str(model_dir / "model"), "--data", str(data)]) == 0
    assert "skipped 1 bad row(s) of 121" in capsys.readouterr().out
