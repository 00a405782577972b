"""`Engine(compile=True)`: the compiled decode step gives the eager engine's tokens."""

import copy
import gc
import weakref

import pytest
import torch

from graftlm.adapters import AdapterConfig, apply_adapters
from graftlm.cli import main
from graftlm.engine import Engine, SamplingParams
from graftlm.models.config import preset
from graftlm.models.transformer import Decoder
from tests.unit.test_engine import model_dir  # noqa: F401 (a fixture: a tiny model with a tokenizer)

pytestmark = pytest.mark.slow  # compiling takes tens of seconds


@pytest.fixture(scope="module")
def model():
    # A sliding window shorter than the prompts: the compiled step's mask must apply it.
    cfg = preset("tiny", vocab_size=300, sliding_window=12)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # sharper than the init, so greedy ties are rare
        model.lm_head.weight.mul_(4)
    return model


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 9)]


def test_compiled_decoding_matches_eager_without_recompiling(model):
    from torch._dynamo.utils import counters

    eager, compiled = Engine(copy.deepcopy(model)), Engine(copy.deepcopy(model), compile=True)
    # Rows of different lengths (left padding) that finish at different steps: the batch
    # shrinks from 3 rows to 1 and its cache is trimmed on the way.
    greedy = [SamplingParams(max_new_tokens=n, temperature=0, stop_ids=()) for n in (20, 7, 33)]
    graphs = counters["stats"]["unique_graphs"]
    got = [c.token_ids for c in compiled.generate(_prompts(), greedy)]
    assert got == [c.token_ids for c in eager.generate(_prompts(), greedy)]
    assert [len(t) for t in got] == [20, 7, 33]
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=3, stop_ids=())
    assert ([c.token_ids for c in compiled.generate(_prompts(), sampled)]
            == [c.token_ids for c in eager.generate(_prompts(), sampled)])
    # One graph for batch 1 and one for every larger batch, whatever the step or capacity.
    assert counters["stats"]["unique_graphs"] - graphs == 2

    # A dropped engine lets go of its graphs: inductor's generated modules hold the frozen
    # weights, and without the engine's finalizer they would stay in sys.modules for the
    # life of the process. (Checked here, on graphs already compiled, as a compile costs
    # tens of seconds.)
    generated = [weakref.ref(module) for module in compiled.compiled_decode._generated]
    assert generated
    del compiled
    gc.collect()
    assert all(ref() is None for ref in generated)


def test_bfloat16_decoding_with_generated_gemms_matches_eager(model, capfd):
    # In bf16 on the CPU inductor also benchmarks its own C++ GEMMs per shape: whichever
    # it picks, the tokens are the eager engine's (the sharpened head keeps greedy
    # choices away from bf16 ties).
    from torch._inductor import config as inductor_config

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    eager, compiled = Engine(copy.deepcopy(bf16)), Engine(copy.deepcopy(bf16), compile=True)
    assert compiled.compiled_decode._gemm_options()["max_autotune"]
    greedy = SamplingParams(max_new_tokens=16, temperature=0, stop_ids=())  # rows end together: one graph
    with inductor_config.patch(force_disable_caches=True):  # so that it benchmarks, whatever ran before
        got = [c.token_ids for c in compiled.generate(_prompts(), greedy)]
    assert got == [c.token_ids for c in eager.generate(_prompts(), greedy)]
    assert "AUTOTUNE" not in capfd.readouterr().err  # its benchmark tables are not printed
    assert not inductor_config.max_autotune  # scoped to the decode step's compile
    assert Engine(copy.deepcopy(model), compile=True).compiled_decode._gemm_options() == {}  # float32

def test_each_engine_compiles_its_own_code(model):
    # Dynamo keeps graphs per code object up to a limit (8): engines sharing one code
    # object would fail from the fifth on, and keep the dead ones' frozen weights.
    first, second = (Engine(copy.deepcopy(model), compile=True).compiled_decode for _ in range(2))
    assert first.module.forward.__code__ is not second.module.forward.__code__


def test_compiled_decoding_with_adapters_matches_eager(model):
    from torch._dynamo.utils import counters

    with_lora = copy.deepcopy(model)
    apply_adapters(with_lora, AdapterConfig(r=4, target_modules=["v_proj", "down_proj"]))
    with torch.no_grad():  # an adapter that visibly changes the tokens
        for name, p in with_lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    eager, compiled = Engine(copy.deepcopy(with_lora)), Engine(copy.deepcopy(with_lora), compile=True)
    greedy = [SamplingParams(max_new_tokens=n, temperature=0, stop_ids=()) for n in (20, 7, 33)]
    graphs = counters["stats"]["unique_graphs"]
    # Base rows decode compiled (the adapter disabled in the graph), a step with an
    # adapter row eagerly; the model's active adapter without per-row names, eagerly.
    for adapters in ([None, None, None], [None, "default", None], None):
        want = [c.token_ids for c in eager.generate(_prompts(), greedy, adapters)]
        assert [c.token_ids for c in compiled.generate(_prompts(), greedy, adapters)] == want
    base = [c.token_ids for c in Engine(copy.deepcopy(model)).generate(_prompts(), greedy)]
    assert [c.token_ids for c in compiled.generate(_prompts(), greedy, [None] * 3)] == base
    assert [c.token_ids for c in compiled.generate(_prompts(), greedy, ["default"] * 3)] != base
    assert counters["stats"]["unique_graphs"] - graphs == 2  # batch 1 and larger, nothing more


def test_graft_generate_compile_prints_the_eager_text(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "ROMEO: what light",
            "--prompt", "KING:", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    captured = capsys.readouterr()
    assert captured.out == eager
    assert "compiling the decode step" in captured.err
