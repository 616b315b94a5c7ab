"""`python -m fipo_lite export`: a run's adapter merged into its base, written as a directory that
transformers loads, with the logits of base + adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fipo_lite import checkpoint, rewards
from fipo_lite.config import load_config
from fipo_lite.exporting import INFO_FILE, main as export
from fipo_lite.trainer import train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["12+34=", "Compute 907 + 88.\n"]


@rewards.register("test_export_parity")
def _parity(response, ground_truth):
    """Scores that differ within a group even for a random model, so every step moves the adapter."""
    ok = sum(map(ord, response)) % 2 == 0
    return float(ok), ok, None


def _train_cfg(model_dir: Path, out: Path, **extra):
    base = {"model.path": str(model_dir), "output_dir": str(out), "trainer.total_steps": 2, "trainer.train_batch_size": 4,
            "trainer.ppo_mini_batch_size": 2, "trainer.micro_batch_size": 8, "rollout.n": 4, "rollout.max_new_tokens": 16,
            "trainer.eval_every": 0, "trainer.save_every": 1, "trainer.progress": False, "trainer.lr": 2e-2,
            "reward.name": "test_export_parity", "algorithm.filter_groups.enable": False,
            "data.train": "synthetic:addition", "data.val": "synthetic:addition"}
    base.update(extra)
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def head_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Two LoRA steps with the adapter on every projection and on lm_head, which the tiny model ties to its embeddings."""
    out = tmp_path_factory.mktemp("export_run")
    targets = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"
    train(_train_cfg(tiny_model_dir, out, **{"lora.target_modules": targets}))
    return out


def _logits(model, tok) -> torch.Tensor:
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _tok(path):
    from fipo_lite.backends.hf import load_tokenizer

    return load_tokenizer(str(path))


def _peft_reference(base_dir: Path, adapter: Path, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def test_export_equals_base_plus_adapter_and_keeps_the_embeddings(head_run, tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = head_run / "checkpoints" / "step_000002"
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    head_b = [v for k, v in adapter.items() if "lm_head" in k and "lora_B" in k]
    assert head_b and head_b[0].abs().sum() > 0  # the head's adapter was trained: merging it matters

    out = tmp_path / "merged"
    assert export([str(head_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", INFO_FILE} <= {p.name for p in out.iterdir()}
    info = json.loads((out / INFO_FILE).read_text())
    assert info["step"] == 2 and info["merged_lora"] and info["dtype"] == "float32"

    tok = _tok(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    ref = _peft_reference(tiny_model_dir, ckpt / "adapter")
    assert torch.allclose(_logits(merged, tok), _logits(ref, tok), atol=1e-5, rtol=1e-5)
    # lm_head got W + BA; the token embeddings it was tied to are the base's, untouched
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(merged.get_output_embeddings().weight, base.get_output_embeddings().weight)
    assert merged.config.tie_word_embeddings is False
    # tokenizer and generation config: the base's, stopping at its EOS
    assert merged.generation_config.eos_token_id == tok.eos_token_id
    saved = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "1+2"}]
    assert saved.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)


def _hand_made_run(model_dir: Path, run: Path, lora: bool) -> Path:
    """A run directory whose checkpoint holds a known adapter (or full weights), saved as the trainer saves."""
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import apply_lora

    cfg = load_config(None, [f"model.path={model_dir}", f"output_dir={run}", f"lora.enable={str(lora).lower()}"])
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        model = apply_lora(model, cfg.lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    checkpoint.save(run / "checkpoints", 3, model, {"step": 3}, config=OmegaConf.to_container(cfg))
    return run / "checkpoints" / "step_000003"


def test_adapter_off_the_head_keeps_embeddings_tied_and_dtype_applies(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ckpt = _hand_made_run(tiny_model_dir, tmp_path / "run", lora=True)
    out = tmp_path / "bf16"
    assert export([str(ckpt), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings is True
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    tok = _tok(tiny_model_dir)
    ref = _logits(_peft_reference(tiny_model_dir, ckpt / "adapter"), tok)
    got = _logits(merged, tok)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # bfloat16 rounding of the merged weights, not a lost adapter
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok)
    assert (got - ref).abs().max() < (base - ref).abs().max() / 4


def test_full_fine_tune_exports_its_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    ckpt = _hand_made_run(tiny_model_dir, run, lora=False)
    out = tmp_path / "full"
    assert export([str(run), "--out", str(out)]) == 0
    assert not json.loads((out / INFO_FILE).read_text())["merged_lora"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = AutoModelForCausalLM.from_pretrained(ckpt / "adapter").eval()
    tok = _tok(tiny_model_dir)
    assert torch.equal(_logits(merged, tok), _logits(trained, tok))


def test_refuses_missing_and_damaged_checkpoints(head_run, tmp_path, capsys):
    def error(args) -> str:
        assert export([*args, "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and not (tmp_path / "never").exists()
        return err

    assert "does not exist" in error([str(tmp_path / "nowhere")])
    assert "neither a run directory" in error([str(tmp_path)])
    run = tmp_path / "run"
    shutil.copytree(head_run, run)
    weights = run / "checkpoints" / "step_000002" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "does not match its checksum" in error([str(run / "checkpoints" / "step_000002")])
    # the run falls back to its newest good checkpoint, saying so
    out = tmp_path / "from_step_1"
    assert export([str(run), "--out", str(out)]) == 0
    assert "step_000002" in capsys.readouterr().err and json.loads((out / INFO_FILE).read_text())["step"] == 1
    shutil.rmtree(run / "checkpoints" / "step_000001")
    assert "without finished checkpoints that verify" in error([str(run)])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert export([str(head_run), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_push_to_hub_without_its_package_names_the_extra(head_run, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "huggingface_hub" else real(name, *a))
    assert export([str(head_run), "--out", str(tmp_path / "x"), "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "huggingface_hub" in err and ".[hub]" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_notebook_api_export(head_run, tmp_path):
    import fipo_lite
    from fipo_lite import api

    out = fipo_lite.export(api.Run.load(head_run), tmp_path / "nb")
    assert out == tmp_path / "nb" and (out / "model.safetensors").is_file()
