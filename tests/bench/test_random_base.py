"""The random base built layer by layer (bench/random_base.py) on tiny Llama shapes, on the CPU:
it is the model that loading the same bf16 weights with our BitsAndBytesConfig gives, peft trains it, and no
more than one decoder layer's linear weights ever exist in 16-bit."""

from __future__ import annotations

import gc

import pytest
import torch

from bench.random_base import build_random_base
from contract.options import ConfigError, TrainingConfig
from worker.training.model import disable_cpu_inference_repacking, quantization_config

CPU = torch.device("cpu")
VOCAB = 512


def tiny_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    return LlamaConfig(**(values | overrides))


def config(**options) -> TrainingConfig:
    """bf16 pinned: these tests check what a 16-bit base holds (tiny shapes, quick even where bf16 is emulated)."""
    return TrainingConfig(attn_implementation="sdpa", compute_dtype="bf16", **options)


def decoder_linears(model):
    return [(name, m) for name, m in model.named_modules() if ".layers." in name and isinstance(m, torch.nn.Linear)]


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_decoder_linears_are_4bit_and_the_rest_stays_in_the_compute_dtype(quant_type, double_quant):
    import bitsandbytes as bnb

    model = build_random_base(tiny_config(), config(quant_type=quant_type, double_quant=double_quant), CPU)
    linears = decoder_linears(model)
    assert len(linears) == 2 * 7
    for name, linear in linears:
        assert isinstance(linear, bnb.nn.Linear4bit), name
        assert linear.weight.bnb_quantized and linear.weight.dtype == torch.uint8
        assert linear.weight.quant_type == quant_type and linear.weight.compress_statistics == double_quant
        assert linear.weight.blocksize == 64 and linear.compute_dtype == torch.bfloat16
        assert linear.weight.quant_state.nested == double_quant
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(not t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_loaded_in_4bit and model.is_quantized and model.quantization_method == "bitsandbytes"
    assert model.hf_quantizer.quantization_config.bnb_4bit_quant_type == quant_type
    assert model.config.use_cache is False and not model.training

    inv_freq = model.model.rotary_emb.inv_freq
    dim = 64 // 4
    assert torch.allclose(inv_freq, 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def test_same_as_loading_the_same_weights_quantized_on_load(tmp_path):
    """Quantization 'none' with the same seed gives the 16-bit weights; loaded with our BitsAndBytesConfig they
    must give exactly the 4-bit weights and logits that the layer-by-layer build gives."""
    from transformers import AutoModelForCausalLM

    cfg = config()
    built = build_random_base(tiny_config(), cfg, CPU, seed=3)
    build_random_base(tiny_config(), config(quantization="none"), CPU, seed=3).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization_config(cfg), dtype=torch.bfloat16,
                                                  device_map={"": CPU}, attn_implementation="sdpa")
    disable_cpu_inference_repacking(loaded)

    for (name, ours), (_, theirs) in zip(decoder_linears(built), decoder_linears(loaded), strict=True):
        assert torch.equal(ours.weight.data, theirs.weight.data), name
        assert torch.equal(ours.weight.quant_state.absmax, theirs.weight.quant_state.absmax), name
    with torch.no_grad():
        assert torch.equal(built(tokens()).logits, loaded(tokens()).logits)
    for attribute in ("is_loaded_in_4bit", "is_quantized", "quantization_method"):
        assert getattr(built, attribute) == getattr(loaded, attribute), attribute


def test_seed_decides_the_weights_and_the_callers_rng_is_untouched():
    rng = torch.get_rng_state()
    first, again = (build_random_base(tiny_config(), config(), CPU, seed=1) for _ in range(2))
    other = build_random_base(tiny_config(), config(), CPU, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)

    def weights(model):
        return [model.get_input_embeddings().weight, *(m.weight.data for _, m in decoder_linears(model))]

    assert all(torch.equal(a, b) for a, b in zip(weights(first), weights(again), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(weights(first), weights(other), strict=True))


def test_tied_embeddings_stay_tied():
    model = build_random_base(tiny_config(tie_word_embeddings=True), config(), CPU)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_lora_trains_through_the_4bit_base():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = build_random_base(tiny_config(), config(), CPU)
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapted = [m for name, m in peft_model.named_modules() if isinstance(m, LoraLinear4bit)]
    assert len(adapted) == 2 * 7  # every decoder linear, not the head
    peft_model.train()
    batch = tokens()
    peft_model(input_ids=batch, labels=batch).loss.backward()
    first_layer_b = [p for name, p in peft_model.named_parameters() if ".layers.0." in name and "lora_B" in name]
    assert len(first_layer_b) == 7
    for p in first_layer_b:  # lora_B starts at zero, so lora_A's gradient is zero at first; lora_B's is not
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_at_most_one_decoder_layer_exists_in_16_bit_at_any_time(monkeypatch):
    """Just before each linear layer is quantized (the moment 16-bit weights pile up if they are not freed), and
    after the build, sum the bytes of every live 16-bit matrix the build created, embeddings and head excepted."""
    import bitsandbytes as bnb

    def live_16bit_matrices() -> dict[int, int]:
        found = {}
        for obj in gc.get_objects():
            if type(obj) in (torch.Tensor, torch.nn.Parameter, bnb.nn.Params4bit) and not obj.is_meta and obj.dim() == 2 \
                    and obj.dtype == torch.bfloat16 and obj.shape[0] != VOCAB:
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
        return found

    gc.collect()
    before = live_16bit_matrices()  # whatever other tests left alive
    observed: list[int] = []
    quantize = bnb.nn.Params4bit._quantize

    def observing_quantize(self, device):
        observed.append(sum(n for ptr, n in live_16bit_matrices().items() if ptr not in before))
        return quantize(self, device)

    monkeypatch.setattr(bnb.nn.Params4bit, "_quantize", observing_quantize)
    model = build_random_base(tiny_config(num_hidden_layers=3), config(), CPU)
    after = sum(n for ptr, n in live_16bit_matrices().items() if ptr not in before)

    one_layer = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # bf16 q, o, k, v, gate, up, down
    assert len(observed) == 3 * 7
    assert max(observed) == one_layer  # reached once per layer, never more
    assert after == 0
    del model


def test_no_quantization_keeps_bf16_linears():
    model = build_random_base(tiny_config(), config(quantization="none"), CPU)
    for name, linear in decoder_linears(model):
        assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.bfloat16, name
    assert not getattr(model, "is_loaded_in_4bit", False) and getattr(model, "hf_quantizer", None) is None
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()


def test_8bit_is_refused():
    with pytest.raises(ConfigError) as error:
        build_random_base(tiny_config(), config(quantization="8bit"), CPU)
    assert error.value.param == "quantization"


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tensor shared by two owners counts once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor)}
    return sum(seen.values())


def quant_state_tensors(model) -> list:
    out = []
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            out += [state.absmax, state.code, state.offset]
            if state.state2 is not None:
                out += [state.state2.absmax, state.state2.code]
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_the_estimates_static_terms_are_the_bytes_of_the_built_model(tied, quant_type, double_quant):
    """Llama-3-70B's proportions scaled down (GQA 8:1, intermediate 3.5 x hidden, untied head, rope_theta 500000):
    the estimate's base weights, LoRA weights and 8-bit optimizer state against the bytes of the tensors that
    build_random_base, add_adapters and one optimizer step actually create. What the estimate leaves out is a
    constant per quantized matrix (bitsandbytes' 16-entry 4-bit code, the 256-entry code of the nested absmax
    and its offset), the rotary buffers and the optimizer's two 256-entry quantization maps; anything that grows
    with the weights (an fp32 absmax, fp32 embeddings, a head counted once) would be far above that."""
    from contract.memory import estimate_memory
    from worker.training.model import add_adapters
    from worker.training.optim import build_optimizer
    from worker.training.tunables import LOSS_CHUNK_TOKENS

    layers = 2
    shape = dict(vocab_size=2000, hidden_size=512, intermediate_size=1792, num_hidden_layers=layers, num_attention_heads=8,
                 num_key_value_heads=1, max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=tied)
    cfg = config(quant_type=quant_type, double_quant=double_quant, lora_r=16, target_modules="all-linear", optimizer="adamw_8bit",
                 gradient_checkpointing="on")
    estimate = estimate_memory(shape, cfg, tokens_per_micro_batch=64, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    model = build_random_base(tiny_config(**shape), cfg, CPU)
    matrices = layers * 7
    per_matrix_tables = 16 * 4 + (256 * 4 + 4 if double_quant else 0)  # fp32 codes (and the nested offset), not modelled
    rotary = storage_bytes(model.buffers())

    base = storage_bytes([*model.parameters(), *model.buffers(), *quant_state_tensors(model)])
    assert base - estimate.base_weights == matrices * per_matrix_tables + rotary

    built = add_adapters(model, cfg, CPU, ("on",) * layers)
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    assert len(trainable) == matrices * 2
    assert storage_bytes(trainable) == estimate.lora_params == estimate.gradients

    optimizer = build_optimizer(trainable, cfg)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = storage_bytes([v for s in optimizer.state.values() for k, v in s.items() if k not in ("qmap1", "qmap2")])
    maps = storage_bytes([v for s in optimizer.state.values() for k, v in s.items() if k in ("qmap1", "qmap2")])
    assert maps == 2 * 256 * 4  # shared by every tensor with 8-bit state
    assert state - estimate.optimizer_state <= 4 * len(trainable)  # the step counter, if it is a tensor
    assert state >= estimate.optimizer_state
