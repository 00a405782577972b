"""Adapters in memory: routing rows, refusing wrong bases, QLoRA, references, resume."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftlm.adapters as A
from graftlm.adapters import qlora
from graftlm.errors import ConfigError, GraftError
from graftlm.models import Decoder, ModelConfig
from graftlm.models.hf import load_model, save_model
from graftlm.objectives.logprobs import cross_entropy, shift_targets


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, max_seq_len=64)
    cfg.update(overrides)
    model = Decoder(ModelConfig(**cfg))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def randomize(model, name=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.adapter_params(model, name):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


IDS = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="adapter.kind"):
        A.AdapterConfig(kind="ia3").validate()
    with pytest.raises(ConfigError, match="adapter.r"):
        A.AdapterConfig(r=0).validate()
    with pytest.raises(ConfigError, match="adapter.target_modules"):
        A.apply_adapters(tiny(), A.AdapterConfig(target_modules=["nonexistent_proj"]))
    with pytest.raises(ConfigError, match="invalid regex"):
        A.AdapterConfig(target_modules=["(q_proj"]).validate()


def test_config_is_a_section_of_a_run_config():
    from dataclasses import dataclass, field

    from graftlm.config import build_config

    @dataclass
    class Run:
        adapter: A.AdapterConfig = field(default_factory=A.AdapterConfig)

    run = build_config(Run, overrides={"adapter.kind": "dora", "adapter.r": "8",
                                       "adapter.target_modules": "q_proj,v_proj"})
    assert run.adapter.kind == "dora" and run.adapter.r == 8
    assert run.adapter.targets == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="adapter.dropout"):
        build_config(Run, overrides={"adapter.dropout": "1.5"})


def test_only_adapters_train_and_disable_gives_the_base():
    model = tiny()
    base = model(IDS)
    A.apply_adapters(model, A.AdapterConfig(r=4, modules_to_save=["lm_head"]))
    assert A.has_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("modules_to_save" in n) for n in trainable)
    assert torch.allclose(model(IDS), base, atol=1e-6)  # B = 0 and a fresh copy of lm_head
    randomize(model)
    assert (model(IDS) - base).abs().max() > 1e-3
    with A.disable_adapters(model):
        assert torch.allclose(model(IDS), base, atol=1e-6)
        assert model.lm_head.weight is model.lm_head.original_module.weight


def test_mixed_batch_rows_match_each_row_alone():
    model = tiny()
    A.apply_adapters(model, A.AdapterConfig(r=4, modules_to_save=["lm_head"]), name="a")
    A.apply_adapters(model, A.AdapterConfig(kind="dora", r=2, target_modules=["q_proj", "down_proj"]), name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    names = ["a", None, "b", "a"]
    with A.row_adapters(model, names):
        mixed = model(IDS)
    for row, name in enumerate(names):
        A.set_active_adapter(model, name)
        alone = model(IDS[row:row + 1])
        # Float32 rounding only: a batch of 4 rows and one row take different matmul
        # blockings on some CPUs (AVX2: up to 1.4e-5 on logits of ~5); the wrong adapter
        # moves them by tenths.
        scale = alone[0].abs().max().item()
        assert (mixed[row] - alone[0]).abs().max().item() <= 1e-5 * max(1.0, scale), (row, name)
    # the batch of hidden states [B, T, H] through one layer, too
    layer = model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 64)
    with A.row_adapters(model, ["b", "b", None]):
        out = layer(x)
    A.set_active_adapter(model, "b")
    assert torch.allclose(out[:2], layer(x[:2]), atol=1e-6)
    with A.disable_adapters(model):
        assert torch.allclose(out[2], layer(x[2:])[0], atol=1e-6)
    with pytest.raises(GraftError, match="not loaded"):
        with A.row_adapters(model, ["zzz"]):
            pass


def test_switch_and_unload_without_reloading_the_base():
    model = tiny()
    base_ptr = model.layers[0].mlp.up_proj.weight.data_ptr()
    A.apply_adapters(model, A.AdapterConfig(r=4), name="a")
    A.apply_adapters(model, A.AdapterConfig(r=4), name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    out_b = model(IDS)
    A.set_active_adapter(model, "a")
    out_a = model(IDS)
    assert (out_a - out_b).abs().max() > 1e-3
    assert model.layers[0].mlp.up_proj.base_layer.weight.data_ptr() == base_ptr
    assert all(p.requires_grad == (".a" in n) for n, p in A.adapter_named_parameters(model).items())
    A.unload_adapter(model, "a")
    assert A.loaded_adapters(model) == ["b"] and A.active_adapter(model) == "b"
    assert torch.allclose(model(IDS), out_b)
    A.unload_adapter(model, "b")
    assert not A.has_adapters(model) and isinstance(model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_reference_with_adapters_shares_the_base_storage():
    model = tiny()
    A.apply_adapters(model, A.AdapterConfig(r=4))
    randomize(model)
    ptrs = {p.data_ptr() for n, p in model.named_parameters() if not p.requires_grad}
    with A.reference(model) as ref:
        assert ref is model
        ref_ptrs = {p.data_ptr() for n, p in ref.named_parameters() if not p.requires_grad}
        with torch.no_grad():
            ref_out = ref(IDS)
    assert ref_ptrs == ptrs
    with A.disable_adapters(model), torch.no_grad():
        assert torch.equal(ref_out, model(IDS))
    assert (model(IDS) - ref_out).abs().max() > 1e-3  # adapters back on after the block


def test_reference_without_adapters_is_one_frozen_copy():
    model = tiny()
    with A.reference(model) as first:
        assert first is not model and not any(p.requires_grad for p in first.parameters())
    with A.reference(model) as second:
        assert second is first
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_state_restores_exactly():
    model = tiny()
    A.apply_adapters(model, A.AdapterConfig(kind="dora", r=4, modules_to_save=["embed_tokens"]))
    randomize(model)
    state = A.adapter_state_dict(model)
    out = model(IDS)
    other = A.apply_adapters(tiny(), A.AdapterConfig(kind="dora", r=4, modules_to_save=["embed_tokens"]))
    A.load_adapter_state_dict(other, state)
    assert torch.equal(other(IDS), out)
    with pytest.raises(GraftError, match="shape"):
        A.load_adapter_state_dict(other, {**state, next(iter(state)): torch.zeros(1)})


def test_wrong_base_and_pickle_are_refused(tmp_path):
    model = tiny(seed=0)
    A.apply_adapters(model, A.AdapterConfig(r=4))
    A.save_adapter(model, tmp_path / "ad")
    with pytest.raises(GraftError, match=r"other weights .*weights_sample.*differ \(first in 'embed_tokens.weight'\)"
                                         r".*--allow-other-base"):
        A.load_adapter(tiny(seed=1), tmp_path / "ad")  # same shapes, other weights
    with pytest.raises(GraftError, match=r"different architecture .*intermediate_size 128 \(adapter's base\) vs 192"):
        A.load_adapter(tiny(intermediate_size=192), tmp_path / "ad")
    # without a recorded identity (as from PEFT), the shapes still catch it
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    with pytest.raises(GraftError, match=r"down_proj.lora_A.weight' has shape \(4, 128\).*needs \(4, 192\)"):
        A.load_adapter(tiny(intermediate_size=192), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").rename(tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(GraftError, match="pickle"):
        A.load_adapter(tiny(), tmp_path / "ad")


def test_the_same_base_in_any_precision_takes_the_adapter_and_a_fine_tuned_one_only_when_allowed(tmp_path):
    model = tiny()
    A.apply_adapters(model, A.AdapterConfig(r=4))
    randomize(model)
    A.save_adapter(model, tmp_path / "ad")
    want = model(IDS)
    # float16 rounds differently from bf16: a hash of rounded values took this for another base
    for dtype in (torch.bfloat16, torch.float16):
        A.load_adapter(tiny().to(dtype), tmp_path / "ad")
    tuned = tiny()
    with torch.no_grad():  # a light fine-tune of one weight: 2% of its scale, beyond any rounding
        weight = tuned.layers[1].mlp.down_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.02 * weight.std())
    with pytest.raises(GraftError, match=r"differ \(first in 'layers.1.mlp.down_proj.weight'\)"):
        A.load_adapter(tuned, tmp_path / "ad")
    A.load_adapter(tuned, tmp_path / "ad", allow_other_base=True)
    assert not torch.equal(tuned(IDS), want) and torch.allclose(tuned(IDS), want, atol=0.1)


def test_an_adapter_recorded_by_an_earlier_graftlm_says_its_base_weights_go_unchecked(tmp_path, capsys):
    import json
    model = A.apply_adapters(tiny(), A.AdapterConfig(r=4))
    A.save_adapter(model, tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    old = {"config_sha256": A.base_identity(model)["config_sha256"], "weights_sha256": "0" * 64}
    save_file(load_file(weights), weights, metadata={"format": "pt", "graftlm_base_identity": json.dumps(old)})
    A.load_adapter(tiny(seed=1), tmp_path / "ad")
    assert "cannot be compared; only the architecture and the shapes are checked" in capsys.readouterr().err
    with pytest.raises(GraftError, match="does not exist"):
        A.load_adapter(tiny(), tmp_path / "nosuch")


def test_weights_sample_of_a_tensor_past_float32_integers_stays_in_range():
    # 2**24 + 4 elements: float32 rounds the last index, 2**24 + 3, up to 2**24 + 4 (one past
    # the end). A 1B model's embedding is larger; its adapter failed to attach on CUDA.
    from graftlm.adapters.identity import weights_sample
    big = torch.nn.Linear(2**22 + 1, 4, bias=False)
    with torch.no_grad():
        big.weight.view(-1)[-1] = 7.0
    sample = torch.frombuffer(bytearray(__import__("base64").b64decode(weights_sample(big))), dtype=torch.float32)
    assert sample[-1] == 7.0


def test_adapter_round_trips_with_several_named(tmp_path):
    model = tiny()
    A.apply_adapters(model, A.AdapterConfig(kind="dora", r=4, target_modules=["q_proj", "v_proj"]), name="x")
    randomize(model, "x")
    A.save_adapter(model, tmp_path / "x")
    want = model(IDS)
    fresh = tiny()
    A.apply_adapters(fresh, A.AdapterConfig(r=2), name="first")
    A.load_adapter(fresh, tmp_path / "x", name="x")
    assert A.active_adapter(fresh) == "first"  # loading does not switch
    A.set_active_adapter(fresh, "x")
    assert torch.allclose(fresh(IDS), want, atol=1e-6)


def test_an_adapter_loaded_for_inference_runs_in_the_models_mode_and_dtype(tmp_path):
    # Trained with dropout and a fully trained head (float32 copy): loaded onto a model in
    # eval mode, dropout is off; onto a bfloat16 model, the head computes in bfloat16.
    model = tiny().train()
    A.apply_adapters(model, A.AdapterConfig(r=4, dropout=0.5, modules_to_save=["lm_head"]))
    randomize(model)
    A.save_adapter(model, tmp_path / "a")
    served = tiny()
    A.load_adapter(served, tmp_path / "a")
    assert not any(m.training for m in served.modules())
    assert torch.equal(served(IDS), served(IDS))
    half = tiny().to(torch.bfloat16)
    A.load_adapter(half, tmp_path / "a")
    assert torch.equal(half(IDS), copy.deepcopy(served).to(torch.bfloat16)(IDS))


def test_merge_refuses_non_finite_and_leaves_the_base():
    model = tiny()
    A.apply_adapters(model, A.AdapterConfig(r=4))
    before = model(IDS)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.lora_B["default"].fill_(float("inf"))
        model.layers[1].mlp.up_proj.lora_A["default"].fill_(1.0)
    with pytest.raises(GraftError, match="non-finite"):
        A.merge(model)
    assert all(getattr(m, "merged", None) is None for m in model.modules())
    with A.disable_adapters(model):
        assert torch.allclose(model(IDS), before, atol=1e-6)


@pytest.mark.parametrize("base_dtype, precision, stored", [
    ("auto", "bf16-autocast", torch.bfloat16), ("auto", "bf16", torch.bfloat16), ("auto", "fp32", torch.float32),
    ("auto", None, torch.float32), ("float32", "bf16-autocast", torch.float32), ("bfloat16", "fp32", torch.bfloat16)])
def test_frozen_base_storage_follows_the_runs_precision(base_dtype, precision, stored):
    """`base_dtype: auto` (the default) keeps the frozen base in bf16 when the run computes
    in bf16, and in float32 otherwise or outside a run; an explicit dtype is kept. The
    run passes its precision (runs.apply_parameterization); the adapters stay float32."""
    from graftlm.runs import RunConfig, apply_parameterization
    from graftlm.trainer import TrainConfig
    model = tiny()
    cfg = A.AdapterConfig(r=4, base_dtype=base_dtype)
    if precision is None:
        A.apply_adapters(model, cfg)
    else:
        apply_parameterization(model, RunConfig(train=TrainConfig(precision=precision), adapter=cfg))
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {stored}
    assert {p.dtype for p in A.adapter_params(model)} == {torch.float32}


def test_qlora_base_is_nf4_small_close_and_only_adapters_get_gradients():
    bf16_model = tiny(hidden_size=128, intermediate_size=256)
    A.apply_adapters(bf16_model, A.AdapterConfig(r=4, base_dtype="bfloat16"))
    q_model = tiny(hidden_size=128, intermediate_size=256)
    A.apply_adapters(q_model, A.AdapterConfig(kind="qlora", r=4))
    randomize(bf16_model)
    randomize(q_model)

    def base_linear_weights(m):
        return [mod.base_layer.weight for mod in m.modules() if isinstance(mod, A.lora.LoraLinear)]

    nf4_bytes = sum(qlora.storage_bytes(w) for w in base_linear_weights(q_model))
    bf16_bytes = sum(qlora.storage_bytes(w) for w in base_linear_weights(bf16_model))
    assert all(qlora.is_nf4(w) for w in base_linear_weights(q_model))
    assert nf4_bytes <= 0.3 * bf16_bytes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = bf16_model(IDS).float(), q_model(IDS).float()
    assert (out - ref).abs().mean() / ref.abs().mean() < 0.15
    q_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = q_model(IDS, output_hidden=True)
        loss, count = cross_entropy(hidden, q_model.lm_head.weight, shift_targets(IDS))
    (loss / count).backward()
    grads = {n for n, p in q_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad.abs().sum() > 0 for n, p in q_model.named_parameters() if "lora_B" in n)


def test_qlora_merge_and_unload_dequantizes(tmp_path):
    model = tiny(hidden_size=128, intermediate_size=256)
    A.apply_adapters(model, A.AdapterConfig(kind="qlora", r=4))
    randomize(model)
    with torch.no_grad():
        adapted = model(IDS)
    plain = A.merge_and_unload(model)
    assert not any(qlora.is_nf4(p) for p in plain.parameters())
    with torch.no_grad():
        merged = plain(IDS)
    assert (merged - adapted).abs().max() / adapted.abs().max() < 0.05  # bf16 compute vs float32
    save_model(plain, tmp_path / "m")
    assert torch.allclose(load_model(tmp_path / "m")(IDS), merged, atol=1e-5)


def test_fused_lora_linear_gradients_are_exact():
    """One layer with a bias: float64 gradient check of the fused Function."""
    from graftlm.adapters.lora import _FusedLoraLinear
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight, bias = torch.randn(6, 8, dtype=torch.float64, generator=g), torch.randn(6, dtype=torch.float64, generator=g)
    a = torch.randn(3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: _FusedLoraLinear.apply(x, a, (3,), (0.7,), weight, bias, b)[0], (x, a, b))


def test_grouped_lora_linear_gradients_are_exact():
    """q/k/v-style layers on one input, of different widths, ranks and scales, one with
    a bias: float64 gradient check of the fused Function for a group."""
    from graftlm.adapters.lora import _FusedLoraLinear
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    widths, ranks, scales = (6, 4, 4), (3, 2, 3), (0.7, 2.0, 0.5)
    weights = [torch.randn(w, 8, dtype=torch.float64, generator=g) for w in widths]
    biases = [torch.randn(6, dtype=torch.float64, generator=g), None, None]
    a = torch.randn(sum(ranks), 8, dtype=torch.float64, generator=g, requires_grad=True)
    bs = [torch.randn(w, r, dtype=torch.float64, generator=g, requires_grad=True) for w, r in zip(widths, ranks)]

    def grouped(x, a, *bs):
        flat = [t for w, bias, b in zip(weights, biases, bs) for t in (w, bias, b)]
        return _FusedLoraLinear.apply(x, a, ranks, scales, *flat)

    assert torch.autograd.gradcheck(grouped, (x, a, *bs))


def _grads_of_adapters(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids)
    (out.float().square().mean()).backward()
    return out.detach(), [p.grad.clone() for p in A.adapter_params(model)]


@pytest.mark.slow
def test_compiled_groups_equal_eager():
    """Compiled blocks take q/k/v's and gate/up's updates inside one matmul over
    [x | x·Aᵀ] (`_FusedLoraLinear.forward`); outputs and adapter gradients equal the
    eager in-place form's, biases included, to float32 rounding."""
    import copy
    eager = tiny(attention_bias=True).train()
    A.apply_adapters(eager, A.AdapterConfig(r=4, alpha=8))
    randomize(eager)
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    want, got = _grads_of_adapters(eager, IDS), _grads_of_adapters(compiled, IDS)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_projections_equal_layer_by_layer(monkeypatch):
    """The model's q/k/v and gate/up run as one group when all are plain LoRA layers on
    the fused path; the result equals calling each layer, and a layer off the fused path
    (here: disabled) sends its group back to layer by layer."""
    from graftlm.adapters import lora
    from graftlm.models import transformer
    model = tiny(attention_bias=True).train()
    A.apply_adapters(model, A.AdapterConfig(r=4, alpha=8))
    randomize(model)
    calls = []
    real = lora.fused_lora_linear
    monkeypatch.setattr(lora, "fused_lora_linear", lambda x, layers: calls.append(len(layers)) or real(x, layers))
    grouped = _grads_of_adapters(model, IDS)
    assert calls == [3, 1, 2, 1] * 2  # q/k/v, o, gate/up and down in each of the two blocks
    with monkeypatch.context() as m:
        m.setattr(transformer, "project", lambda x, layers: tuple(layer(x) for layer in layers))
        single = _grads_of_adapters(model, IDS)
    # Equal up to float32 rounding (bit for bit where stacking the A's keeps the kernels'
    # summation order, as on AMX CPUs; AVX2 differs by ~3e-6).
    torch.testing.assert_close(grouped[0], single[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grouped[1], single[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    calls.clear()
    model.layers[0].self_attn.k_proj.disabled = True
    model(IDS)
    assert calls == [1, 1, 1, 2, 1, 3, 1, 2, 1]  # block 0's q/k/v went layer by layer (k unadapted)


def test_qlora_imports_torchao_without_its_warnings():
    """torchao warns on import about kernels NF4 never uses; a QLoRA run's log must not
    open with them. A fresh interpreter, since torchao imports once per process."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", "from graftlm.adapters import qlora; qlora._nf4()"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""
