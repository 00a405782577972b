"""SFT loss masks against TRL 1.16: the same ids, the same trained tokens, the same loss.

TRL prepares the data itself here (its SFTTrainer's own dataset preparation), with
`assistant_only_loss` (a ChatML template with `{% generation %}` markers, which renders
the same text as graftlm's ChatML) and `completion_only_loss` (prompt/completion rows,
conversational and raw). graftlm renders the same rows with `Renderer`; masks must match
token for token, and the SFT loss computed by TRL's trainer from its labels must equal
graftlm's chunked cross-entropy from its mask.
"""

import pytest
import torch

from graftlm.data.render import Renderer
from graftlm.models.hf import load_model
from graftlm.objectives.logprobs import cross_entropy, shift_targets
from graftlm.tokenizer import BOS, EOS, PAD, Tokenizer, load_tokenizer, train_tokenizer
from tests.conftest import SHARED_DATA, make_hf_model

MARKED_CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who art thou?"},
     {"role": "assistant", "content": "A citizen of Rome."}, {"role": "user", "content": "And thy name?"},
     {"role": "assistant", "content": "Menenius, good sir."}],
    [{"role": "user", "content": "Speak, speak."}, {"role": "assistant", "content": "You are all resolved rather to die than to famish?"}],
]
PROMPT_COMPLETIONS = [("First Citizen: Before we proceed any further,", " hear me speak."),
                      ("All: Resolved.", " resolved.")]


def sft_trainer(tmp_path, hf_dir, rows, **config):
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", max_length=None,
                     per_device_train_batch_size=2, use_cpu=True, **config)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)


def assert_same_masks_and_loss(trainer, hf_dir, rendered):
    prepared = trainer.train_dataset
    assert len(prepared) == len(rendered)
    for row, ours in zip(prepared, rendered):
        assert row["input_ids"] == ours.input_ids
        assert [label != -100 for label in row["labels"]] == ours.loss_mask
    # The loss TRL's trainer computes from its labels equals graftlm's from its mask.
    batch = trainer.data_collator([{k: r[k] for k in ("input_ids", "labels")} for r in prepared])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        model = load_model(hf_dir)
        total, count = torch.zeros(()), torch.zeros(())
        for ours in rendered:
            ids = torch.tensor([ours.input_ids])
            hidden = model(ids, output_hidden=True)
            loss_sum, n = cross_entropy(hidden, model.lm_head.weight,
                                        shift_targets(ids, torch.tensor([ours.loss_mask])))
            total, count = total + loss_sum, count + n
    assert abs(trl_loss - (total / count).item()) < 1e-5


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny llama with a graftlm-trained ChatML tokenizer (TRL gets the marked template)."""
    root = tmp_path_factory.mktemp("trlsft")
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:60_000]
    tok = train_tokenizer(iter([text]), 320)
    make_hf_model("llama", root / "hf", vocab_size=tok.vocab_size)
    tok.save(root / "hf")
    return root, load_tokenizer(root / "hf")


@pytest.mark.slow
def test_assistant_only_masks_match_trl(chat_model, tmp_path):
    root, tok = chat_model
    import transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    for chat in CHATS:  # the marked template renders exactly graftlm's ChatML text
        assert hf_tok.apply_chat_template(chat, tokenize=False, chat_template=MARKED_CHATML) == \
            tok.apply_chat_template(chat)
    hf_tok.chat_template = MARKED_CHATML
    hf_tok.save_pretrained(root / "hf")
    trainer = sft_trainer(tmp_path, root / "hf", [{"messages": c} for c in CHATS], assistant_only_loss=True)
    rendered = [Renderer(tok).render({"messages": c}) for c in CHATS]
    assert_same_masks_and_loss(trainer, root / "hf", rendered)


@pytest.mark.slow
def test_conversational_completion_only_masks_match_trl(chat_model, tmp_path):
    root, tok = chat_model
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in CHATS]
    trainer = sft_trainer(tmp_path, root / "hf", rows, completion_only_loss=True)
    # graftlm trains every assistant turn of a conversation, TRL's completion mask only the
    # completion: compare on the single-turn conversation, where the two agree.
    rendered = [Renderer(tok).render({"messages": r["prompt"] + r["completion"]}) for r in rows]
    prepared = trainer.train_dataset
    single = 1
    assert prepared[single]["input_ids"] == rendered[single].input_ids
    assert [label != -100 for label in prepared[single]["labels"]] == rendered[single].loss_mask
    # On the multi-turn one, TRL's trained tokens are graftlm's last assistant turn.
    ours = rendered[0].loss_mask
    last_turn_start = max(i for i in range(1, len(ours)) if ours[i] and not ours[i - 1])
    trl_mask = [label != -100 for label in prepared[0]["labels"]]
    assert trl_mask == [m and i >= last_turn_start for i, m in enumerate(ours)]


@pytest.mark.slow
def test_raw_prompt_completion_masks_match_trl(tmp_path):
    # A base-model tokenizer (no chat template, no ChatML tokens): raw text + EOS.
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:60_000]
    trained = train_tokenizer(iter([text]), 300, special_tokens=[PAD, BOS, EOS])
    base = Tokenizer(backend=trained.backend, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    make_hf_model("llama", tmp_path / "hf", vocab_size=base.vocab_size)
    base.save(tmp_path / "hf")
    import json
    config_path = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]  # a base model: no template at all
    config_path.write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path / "hf")
    assert tok.chat_template is None
    rows = [{"prompt": p, "completion": c} for p, c in PROMPT_COMPLETIONS]
    trainer = sft_trainer(tmp_path, tmp_path / "hf", rows, completion_only_loss=True)
    rendered = [Renderer(tok).render(r) for r in rows]
    assert_same_masks_and_loss(trainer, tmp_path / "hf", rendered)
