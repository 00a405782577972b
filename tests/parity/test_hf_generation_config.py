"""generation_config.json, stop ids and BOS against transformers: a saved model stops in
`generate` where graftlm stops, a base's generation config survives fine-tuning and its
EOS ids stop graftlm too, and a BOS from tokenizer.json's post-processor is added as
transformers adds it."""

import json

import pytest
import torch

from graftlm.engine import Engine, SamplingParams
from graftlm.models.config import preset
from graftlm.models.hf import load_model, save_model
from graftlm.models.transformer import Decoder
from graftlm.tokenizer import IM_END, load_tokenizer, train_tokenizer
from tests.conftest import make_hf_model

TEXT = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, say yes or no. " * 4]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter(TEXT * 5), vocab_size=300).save(root)
    return root


def _new_model(tok):
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                 pad_token_id=tok.pad_id, tie_embeddings=False)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    return model.eval()


SPECIAL = set(range(6))  # the tokenizer's PAD, BOS, EOS, <|im_start|>, <|im_end|>, and id 5 below


def _make_it_stop_with(model, prompt: list[int], stop: int, new_tokens: int = 24) -> list[int]:
    """Swap lm_head rows so that the greedy continuation of `prompt` emits `stop` a few
    tokens in, where it emitted a token seen nowhere before; returns the tokens up to it."""
    out = Engine(model).generate([prompt], SamplingParams(max_new_tokens=new_tokens, temperature=0,
                                                           stop_ids=()))[0].token_ids
    p = next(i for i in range(3, len(out)) if out[i] not in prompt + out[:i] + [stop] + list(SPECIAL))
    assert not SPECIAL & set(prompt + out[:p]) and stop not in prompt + out[:p]
    with torch.no_grad():
        w = model.lm_head.weight
        w[[out[p], stop]] = w[[stop, out[p]]]
    return out[:p] + [stop]


def _hf_greedy(directory, prompt: list[int], new_tokens: int = 24) -> list[int]:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_a_chatml_model_stops_at_im_end_in_transformers_generate(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    im_end = tok.token_id(IM_END)
    model = _new_model(tok)
    prompt = tok.encode("hello world, say")
    want = _make_it_stop_with(model, prompt, im_end)
    out = save_model(model, tmp_path / "m", tokenizer_dir=tok_dir)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_id, im_end]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_id  # as it was
    ours = Engine(load_model(out), load_tokenizer(out)).generate(
        [prompt], SamplingParams(max_new_tokens=24, temperature=0))[0]
    assert ours.token_ids == want and ours.finish_reason == "stop"
    assert _hf_greedy(out, prompt) == want  # was: 24 tokens, on past <|im_end|>


@pytest.fixture
def base_dir(tmp_path, tok_dir):
    """A transformers model whose generation_config.json lists an EOS (id 5, like Llama
    3.1's <|eom_id|>) that neither config.json nor tokenizer_config.json names, and
    sampling defaults."""
    tok = load_tokenizer(tok_dir)
    make_hf_model("qwen2", tmp_path / "base", vocab_size=tok.vocab_size)
    tok.save(tmp_path / "base")
    generation = {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "do_sample": True,
                  "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path / "base"


def test_an_eos_listed_only_in_generation_config_stops_graftlm_as_transformers(base_dir, tok_dir, tmp_path):
    prompt = load_tokenizer(tok_dir).encode("the quick brown")
    model = load_model(base_dir)
    want = _make_it_stop_with(model, prompt, 5)
    assert 5 in load_tokenizer(base_dir).stop_ids  # graft generate, chat, serve; RL's tokenizer
    greedy = SamplingParams(max_new_tokens=24, temperature=0)
    for engine in (Engine(model, load_tokenizer(base_dir)), Engine(model)):
        assert 5 in engine.default_stop_ids
        assert engine.generate([prompt], greedy)[0].token_ids == want
    save_model(model, tmp_path / "tuned", tokenizer_dir=base_dir)
    assert _hf_greedy(tmp_path / "tuned", prompt) == want


def test_saving_carries_the_base_generation_config_over(base_dir, tmp_path):
    import transformers
    model = load_model(base_dir)
    model.config.pad_token_id = 3  # ids follow the model's config
    save_model(model, tmp_path / "tuned", tokenizer_dir=base_dir)
    saved = json.loads((tmp_path / "tuned" / "generation_config.json").read_text())
    im_end = load_tokenizer(base_dir).token_id(IM_END)
    assert saved["eos_token_id"] == [2, 5, im_end]
    assert saved["pad_token_id"] == 3
    assert {k: saved[k] for k in ("do_sample", "temperature", "top_p", "repetition_penalty")} == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "tuned")
    assert theirs.eos_token_id == [2, 5, im_end] and theirs.temperature == 0.7


def test_a_bad_eos_field_in_generation_config_is_named_at_load(base_dir):
    from graftlm.errors import GraftError
    (base_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(GraftError, match="generation_config.json: field 'eos_token_id'"):
        load_model(base_dir)


def _with_bos_post_processor(tok_dir, out, add_bos_token):
    """tok_dir's tokenizer with a TemplateProcessing that puts BOS first (Llama 3's way)
    and tokenizer_config.json's add_bos_token set as given (None: absent, as in Llama 3)."""
    from tokenizers import Tokenizer as Backend, processors
    out.mkdir()
    backend = Backend.from_file(str(tok_dir / "tokenizer.json"))
    bos = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                           special_tokens=[("<|bos|>", bos)])
    backend.save(str(out / "tokenizer.json"))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config.pop("add_bos_token")
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return bos


def test_an_explicit_add_bos_token_wins_over_the_post_processor(tok_dir, tmp_path):
    # As transformers 4's tokenizers (and graftlm before) read it. transformers 5 ignores
    # tokenizer_config.json's add_bos_token once there is a tokenizer.json, and adds BOS.
    bos = _with_bos_post_processor(tok_dir, tmp_path / "tok", False)
    tok = load_tokenizer(tmp_path / "tok")
    assert not tok.add_bos and tok.encode("yes", add_bos=tok.add_bos)[0] != bos


@pytest.mark.parametrize("add_bos_token", [None, True])
def test_bos_is_added_as_transformers_adds_it(tok_dir, tmp_path, add_bos_token):
    import transformers

    from graftlm.data.render import RenderConfig, Renderer
    from graftlm.data.shards import write_shards
    from graftlm.evaluation.rows import Rows
    from graftlm.evaluation.text import text_windows
    bos = _with_bos_post_processor(tok_dir, tmp_path / "tok", add_bos_token)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    text = "the lazy dog says yes"
    want = theirs(text).input_ids
    assert want[0] == bos and tok.add_bos  # was: add_bos False without add_bos_token
    assert tok.encode(text, add_bos=tok.add_bos) == want  # graft generate's prompt, an RL prompt
    row = Renderer(tok, RenderConfig()).render({"text": text})  # an SFT text row: + EOS
    assert row.input_ids == want + [tok.eos_id]
    write_shards(iter([("train", text), ("val", text)]), tok, tmp_path / "shards")  # graft prepare
    shard = (tmp_path / "shards" / "train-00000.bin").read_bytes()
    assert list(memoryview(shard).cast("H")) == want + [tok.eos_id]
    windows, _, _ = text_windows(tok, [text], 64, Rows())  # graft eval
    assert windows == [want]
