"""lora.adapter_path: RL starts from an existing adapter (peft's save_pretrained, or this kit's checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cfg(model_dir, out, *extra):
    from fipo_lite.config import load_config

    return load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"model.path={model_dir}", f"output_dir={out}", "trainer.total_steps=1", "trainer.train_batch_size=2",
        "trainer.gen_batch_size=2", "trainer.ppo_mini_batch_size=2", "trainer.micro_batch_size=8", "rollout.n=2",
        "rollout.max_new_tokens=8", "trainer.eval_every=0", "data.val_size=0", "trainer.save_every=1", "trainer.progress=false",
        "algorithm.filter_groups.enable=false", "data.train=synthetic:addition", "trainer.lr=1e-2", *extra])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A peft adapter with nonzero weights (init_lora_weights=False), shaped unlike lora's defaults."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("sft") / "adapter"
    model.save_pretrained(str(out))
    return out


def _reference(model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter)).eval()


def test_run_starts_from_a_peft_adapter_and_from_a_checkpoint(tiny_model_dir, sft_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends import load_model
    from fipo_lite.trainer import train

    ids = torch.tensor([[5, 9, 12, 7, 3, 20]])
    cfg = _cfg(tiny_model_dir, tmp_path / "run", f"lora.adapter_path={sft_adapter}")
    assert (cfg.lora.r, cfg.lora.alpha, sorted(cfg.lora.target_modules)) == (4, 8, ["q_proj", "v_proj"])  # the adapter's shape
    policy, _ = load_model(cfg)
    expected = _logits(_reference(tiny_model_dir, sft_adapter), ids)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), ids))
    torch.testing.assert_close(_logits(policy.eval(), ids), expected)  # the initial policy is base + adapter
    assert any(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)  # and it trains

    train(cfg)
    saved = tmp_path / "run" / "checkpoints" / "step_000001" / "adapter"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4
    trained = _logits(_reference(tiny_model_dir, saved), ids)  # (the random model scores 0: the step changed nothing)
    torch.testing.assert_close(trained, expected)  # the run trained the SFT adapter, not a fresh one
    # this kit's run directory (its newest checkpoint) is an adapter to start from too
    again, _ = load_model(_cfg(tiny_model_dir, tmp_path / "run2", f"lora.adapter_path={tmp_path / 'run'}"))
    torch.testing.assert_close(_logits(again.eval(), ids), trained)


def test_a_lora_key_that_contradicts_the_adapter_is_refused(tiny_model_dir, sft_adapter, tmp_path):
    from fipo_lite.config import ConfigError

    with pytest.raises(ConfigError, match=r"'lora\.r' is 8 but the adapter .* has r=4"):
        _cfg(tiny_model_dir, tmp_path / "o", f"lora.adapter_path={sft_adapter}", "lora.r=8")
    with pytest.raises(ConfigError, match=r"lora\.target_modules"):
        _cfg(tiny_model_dir, tmp_path / "o", f"lora.adapter_path={sft_adapter}", "lora.target_modules=[q_proj]")
    with pytest.raises(ConfigError, match=r"lora\.adapter_path='.*nope' is not a LoRA adapter"):
        _cfg(tiny_model_dir, tmp_path / "o", f"lora.adapter_path={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"lora\.adapter_path needs lora\.enable=true"):
        _cfg(tiny_model_dir, tmp_path / "o", f"lora.adapter_path={sft_adapter}", "lora.enable=false")


def test_adapter_start_on_the_nf4_base(tiny_model_dir, sft_adapter, tmp_path):
    """model.backend=bnb4 with lora.adapter_path (the stack lane's bitsandbytes, on a CPU): the QLoRA policy
    starts from the adapter's weights, trainable, and a run steps on the NF4 base from them."""
    pytest.importorskip("bitsandbytes", reason="the stack lane's bitsandbytes is not installed here")
    from safetensors.torch import load_file

    from fipo_lite.backends import load_model
    from fipo_lite.trainer import train

    cfg = _cfg(tiny_model_dir, tmp_path / "run", f"lora.adapter_path={sft_adapter}", "model.backend=bnb4", "model.dtype=float32")
    policy, _ = load_model(cfg)
    saved = load_file(str(sft_adapter / "adapter_model.safetensors"))
    live = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    assert len(live) == len(saved) > 0
    for key, value in saved.items():  # peft saves ...lora_A.weight for the live ...lora_A.default.weight
        param = live[key.replace(".weight", ".default.weight")]
        torch.testing.assert_close(param.detach(), value)
        assert param.requires_grad
    ids = torch.tensor([[5, 9, 12, 7, 3, 20]])
    on = _logits(policy.eval(), ids)
    with policy.disable_adapter():
        assert not torch.allclose(on, _logits(policy, ids))  # the adapter acts on the NF4 base

    train(cfg)
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step_000001" / "adapter" / "adapter_model.safetensors"))
    assert set(trained) == set(saved)  # the run's adapter is the SFT adapter's, not a fresh one of the default shape
