"""The memory planner: parameter counts match transformers, predictions move the right way, configs fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fipo_lite import planner
from fipo_lite.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-32b"])
def test_param_count_matches_qwen2_on_meta_device(name):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**planner.QWEN25[name]))
    assert planner.Arch(**planner.QWEN25[name]).num_params() == sum(p.numel() for p in model.parameters())


def test_lora_param_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    arch = dict(planner.QWEN25["qwen2.5-0.5b"])
    with torch.device("meta"):
        model = get_peft_model(Qwen2ForCausalLM(Qwen2Config(**arch)), LoraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planner.Arch(**arch).lora_params(8, ["q_proj", "down_proj"]) == trainable


def test_arch_from_local_config_json(tmp_path):
    cfg = dict(planner.QWEN25["qwen2.5-1.5b"], model_type="qwen2")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert planner.arch_from(str(tmp_path)) == planner.Arch(**planner.QWEN25["qwen2.5-1.5b"])
    assert planner.arch_from("Qwen/Qwen2.5-Math-7B") == planner.Arch(**planner.QWEN25["qwen2.5-7b"])
    with pytest.raises(ValueError, match="not a known Qwen2.5 size"):
        planner.arch_from("org/some-other-model")


def _plan(config, gpu_gb=80.0, *overrides):
    return planner.plan(load_config(CONFIGS / config, list(overrides)), gpu_gb)


@pytest.mark.parametrize("config,gpu_gb", [("colab_t4.yaml", 15), ("qwen2.5-0.5b.yaml", 24), ("qwen2.5-1.5b.yaml", 48),
                                           ("qwen2.5-7b-math.yaml", 80), ("qwen2.5-32b.yaml", 80)])
def test_each_config_loads_and_fits_its_stated_gpu(config, gpu_gb):
    text = (CONFIGS / config).read_text()
    assert f"{gpu_gb} GB" in text.split("\n", 1)[0]  # the header names the card the plan is checked against
    p = _plan(config, gpu_gb)
    assert p.fits, planner.format_plan(p)
    assert p.kv_concurrency >= 1


def test_colab_t4_fits_15gb_with_margin_in_float16(capsys):
    """A free Colab T4: 15 GB and no bfloat16, so 4-bit QLoRA + vLLM, both in float16."""
    cfg = load_config(CONFIGS / "colab_t4.yaml")
    assert (cfg.model.backend, cfg.model.dtype, cfg.rollout.engine, cfg.rollout.vllm.dtype) == ("bnb4", "float16", "vllm", "float16")
    assert cfg.model.path.startswith("Qwen/Qwen2.5-") and planner.arch_from(cfg.model.path).num_params() < 2e9
    p = _plan("colab_t4.yaml", 15)
    assert p.fits and p.peak_gb <= 0.8 * 15, planner.format_plan(p)  # >= 3 GiB spare for what the planner does not model
    assert p.kv_concurrency >= cfg.trainer.train_batch_size * cfg.rollout.n  # a whole generation batch decodes at once
    assert planner.main(["--config", str(CONFIGS / "colab_t4.yaml"), "--gpu-gb", "15"]) == 0
    assert "-> fits" in capsys.readouterr().out


def test_32b_fits_80gb_only_with_its_settings():
    assert _plan("qwen2.5-32b.yaml").fits
    for change in ["model.backend=bnb4", "model.offload_gradients=false", "rollout.vllm.gpu_memory_utilization=0.85",
                   "trainer.max_tokens_per_micro_batch=45056", "rollout.max_new_tokens=30720"]:
        p = _plan("qwen2.5-32b.yaml", 80, change)
        assert not p.fits, change
        assert p.advice and p.problems, change
    assert not _plan("qwen2.5-32b.yaml", 48).fits


def test_monotone_in_the_knobs():
    base = _plan("qwen2.5-7b-math.yaml")
    assert _plan("qwen2.5-7b-math.yaml", 80, "model.gradient_checkpointing=false").trainer["activations"] > base.trainer["activations"]
    assert _plan("qwen2.5-7b-math.yaml", 80, "trainer.max_tokens_per_micro_batch=49152").trainer["activations"] > base.trainer["activations"]
    assert _plan("qwen2.5-7b-math.yaml", 80, "model.backend=hf").trainer["weights"] > 1.5 * base.trainer["weights"]
    assert _plan("qwen2.5-7b-math.yaml", 80, "lora.r=128", "rollout.vllm.max_lora_rank=128").trainer["lora+optimizer"] > base.trainer["lora+optimizer"]
    assert _plan("qwen2.5-7b-math.yaml", 80, "trainer.optimizer=adamw").trainer["lora+optimizer"] > base.trainer["lora+optimizer"]
    longer = _plan("qwen2.5-7b-math.yaml", 80, "rollout.max_new_tokens=20480", "rollout.vllm.max_model_len=22528")
    assert longer.kv_concurrency < base.kv_concurrency
    side = _plan("qwen2.5-7b-math.yaml", 80, "rollout.vllm.enable_sleep_mode=false")
    assert side.peak_gb > base.peak_gb
    assert _plan("qwen2.5-7b-math.yaml", 40).peak_gb < base.peak_gb  # vLLM's share is a fraction of the card


def test_nf4_weights_match_bitsandbytes_storage():
    """NF4 + double quant: 4 bits per weight + 8-bit absmax per 64 + fp32 per 256 absmax blocks."""
    n = 64 * 256 * 10
    nbytes = n * planner.NF4_BITS_DQ / 8
    assert nbytes == n // 2 + n // 64 + 4 * (n // (64 * 256))


def test_bad_input_and_cli(capsys):
    with pytest.raises(ValueError, match="gpu-gb"):
        _plan("qwen2.5-0.5b.yaml", 0)
    with pytest.raises(ValueError, match="target_modules"):
        _plan("qwen2.5-0.5b.yaml", 24, "lora.target_modules=[qkv]")
    rc = planner.main(["--config", str(CONFIGS / "qwen2.5-32b.yaml"), "--gpu-gb", "24"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out and "try:" in out
    rc = planner.main(["--config", str(CONFIGS / "qwen2.5-0.5b.yaml"), "--gpu-gb", "24", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["fits"] is True


def _saved_bytes(arch: dict, layers: int, tokens: int, targets, r: int) -> int:
    """Bytes of non-parameter tensors autograd saves in a bf16 Qwen2 + LoRA forward (saved-tensor hooks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**dict(arch, num_hidden_layers=layers), attn_implementation="sdpa")).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=r, target_modules=list(targets)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=torch.randint(0, arch["vocab_size"], (1, tokens)))
    return sum(seen.values())


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), ("q_proj", "v_proj")])
def test_activation_estimate_matches_autograd(targets):
    arch = dict(hidden_size=192, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2, intermediate_size=512,
                vocab_size=256, tie_word_embeddings=True)
    tokens, r = 96, 8
    per_layer = (_saved_bytes(arch, 3, tokens, targets, r) - _saved_bytes(arch, 1, tokens, targets, r)) / 2 / tokens
    predicted = planner.Arch(**arch).act_bytes_per_token_layer(targets, r, 2)
    assert predicted == pytest.approx(per_layer, rel=0.1)
