"""`model.backend=unsloth` for real on the CPU (stack lane): Unsloth's CPU fallback loads the tiny
model in 4-bit (bitsandbytes NF4), the RL loop trains it with the HF engine, checkpoints, and a
second run resumes from the checkpoint.

The runs go through `python -m fipo_lite train`'s `main` in a subprocess: Unsloth patches
transformers and peft for the whole process, and the trainer hides vLLM from that process (see
`fipo_lite.backends.unsloth.hide_vllm`). The unit tests at the top need no Unsloth.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fipo_lite import metrics as M
from fipo_lite.backends import unsloth as unsloth_backend
from fipo_lite.config import load_config

ROOT = Path(__file__).resolve().parents[2]
HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None and importlib.util.find_spec("unsloth_zoo") is not None
needs_unsloth = pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth/unsloth_zoo not installed (stack lane only)")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _cfg(*overrides):
    return load_config(None, ["model.backend=unsloth", *overrides])


# ----------------------------------------------------------------------------- kwargs and errors (any lane)
def test_unsloth_kwargs_fast_inference_only_with_vllm_and_processed_logprobs():
    kw = unsloth_backend.unsloth_from_pretrained_kwargs(_cfg("rollout.engine=vllm", "lora.r=8", "rollout.vllm.max_lora_rank=16"), "/m")
    assert kw["fast_inference"] is True and kw["max_lora_rank"] == 16 and kw["load_in_4bit"] is True
    assert kw["training"] is True  # -> unsloth_zoo load_vllm(logprobs_mode="processed_logprobs")
    hf = unsloth_backend.unsloth_from_pretrained_kwargs(_cfg("rollout.engine=hf"), "/m")
    assert not {"fast_inference", "training", "gpu_memory_utilization", "max_lora_rank"} & set(hf)
    assert hf["dtype"] is None and hf["load_in_4bit"] is True
    assert unsloth_backend.unsloth_from_pretrained_kwargs(_cfg("model.dtype=bfloat16"), "/m")["dtype"] is torch.bfloat16


def _zoo_file(name: str) -> Path:
    return Path(importlib.util.find_spec("unsloth_zoo").submodule_search_locations[0]) / name


@needs_unsloth
def test_training_kwarg_reaches_load_vllm_as_processed_logprobs():
    """Read (not import: importing it loads vLLM) unsloth_zoo's `load_vllm`: `training` is one of its
    parameters, and it selects processed_logprobs; Unsloth's from_pretrained forwards load_vllm's own
    parameters from its **kwargs."""
    src = _zoo_file("vllm_utils.py").read_text()
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "load_vllm")
    assert "training" in [a.arg for a in fn.args.args]
    assert 'logprobs_mode          = "processed_logprobs" if training else "raw_logprobs"' in ast.get_source_segment(src, fn)
    models = Path(importlib.util.find_spec("unsloth").submodule_search_locations[0]) / "models"
    assert "inspect.getfullargspec(load_vllm).args" in (models / "llama.py").read_text()
    # ... and Unsloth lists it among the vLLM-only from_pretrained kwargs it drops when vLLM is not used
    loader = ast.parse((models / "loader.py").read_text())
    engine_kwargs = next(n.value for n in ast.walk(loader) if isinstance(n, ast.Assign)
                         and any(getattr(t, "id", None) == "_VLLM_ENGINE_KWARGS" for t in n.targets))
    assert "training" in ast.literal_eval(engine_kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU refusal")
def test_unsloth_with_vllm_engine_refused_on_cpu(capsys, tmp_path):
    from fipo_lite.trainer import main

    rc = main(["model.backend=unsloth", "rollout.engine=vllm", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2
    if HAS_UNSLOTH:
        assert "needs a CUDA GPU" in err and "model.backend=bnb4 with rollout.engine=vllm" in err, err
    else:
        assert "gpu extra" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything loaded or was written


def test_missing_unsloth_names_the_gpu_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("unsloth") else real(name, *a))
    with pytest.raises(ImportError, match="gpu extra"):
        unsloth_backend.check_unsloth(_cfg("rollout.engine=hf"))


def test_hide_vllm_makes_vllm_look_uninstalled(monkeypatch):
    if importlib.util.find_spec("vllm") is None:
        assert unsloth_backend.hide_vllm() is False and "vllm" not in sys.modules
        return
    if "vllm" in sys.modules:
        pytest.skip("vllm is already imported in this process")
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    try:
        assert unsloth_backend.hide_vllm() is True
        # what Unsloth checks before probing vLLM, and what its guarded imports catch
        assert importlib.util.find_spec("vllm") is None
        with pytest.raises(ModuleNotFoundError):
            import vllm  # noqa: F401
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("vllm._C")
        assert unsloth_backend.hide_vllm() is False  # already hidden
    finally:
        if "vllm" in sys.modules and sys.modules["vllm"] is None:
            del sys.modules["vllm"]
    assert importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------- real runs (stack lane)
DRIVER = r'''
import json, sys
from pathlib import Path

report_path, argv = Path(sys.argv[1]), sys.argv[2:]
report = {}
from fipo_lite import checkpoint, trainer
from fipo_lite.backends import unsloth as ub

_load_model, _load_adapter = ub.load_model, checkpoint.load_adapter


def load_model(cfg):
    model, tok = _load_model(cfg)
    import bitsandbytes as bnb
    report["linear4bit"] = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    report["params4bit"] = sum(isinstance(p, bnb.nn.Params4bit) for p in model.parameters())
    report["quant_type"] = sorted({p.quant_type for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)})
    report["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
    report["model_class"] = type(model).__name__
    report["unsloth_patched"] = hasattr(model, "save_pretrained_merged")
    return model, tok


def load_adapter(path, model):  # what the trainer calls to restore a checkpoint's adapter
    state = _load_adapter(path, model)
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(sd, str(report_path.with_suffix(".resumed.safetensors")))
    report["resumed_from"] = str(path)
    return state


ub.load_model, checkpoint.load_adapter = load_model, load_adapter
report["rc"] = trainer.main(argv)
report["vllm_hidden"] = "vllm" in sys.modules and sys.modules["vllm"] is None
report["vllm_ext_loaded"] = sorted(m for m, mod in sys.modules.items() if m.startswith("vllm.") and mod is not None)
report["unsloth_cpu_backend"] = getattr(sys.modules.get("unsloth"), "_IS_CPU_BACKEND", None)
report_path.write_text(json.dumps(report))
'''


def _train(tmp: Path, out: Path, model_dir: Path, name: str, *extra: str) -> dict:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    report = tmp / f"{name}.json"
    args = [f"model.path={model_dir}", f"output_dir={out}", "model.backend=unsloth", "rollout.engine=hf", "model.device=cpu",
            "lora.r=8", "lora.alpha=16", "rollout.n=4", "rollout.max_new_tokens=20", "trainer.train_batch_size=2",
            "trainer.ppo_mini_batch_size=1", "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.save_every=1",
            "trainer.keep_checkpoints=3", "trainer.progress=false", "trainer.lr=5e-3", "trainer.warmup_steps=1",
            "algorithm.filter_groups.max_num_gen_batches=4", "data.train=synthetic:addition", "data.val=synthetic:addition",
            "data.train_size=64", "data.max_prompt_length=64", "reward.name=exact", "trainer.num_threads=2",
            # DAPO's overlong shaping over the whole response budget: scores vary with length inside almost every
            # group, so the steps have a learning signal even where the 4-bit tiny model solves nothing.
            "reward.overlong.enable=true", "reward.overlong.buffer_len=20", "algorithm.filter_groups.metric=score", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, str(driver), str(report), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and report.is_file(), f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rep = json.loads(report.read_text())
    rep["stderr"] = proc.stderr
    return rep


def _adapter(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "adapter" / "adapter_model.safetensors"))


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in M.read_jsonl(out / "metrics.jsonl")]


@needs_unsloth
def test_unsloth_cpu_4bit_trains_checkpoints_and_resumes(tiny_warm_model_dir, tmp_path):
    out = tmp_path / "run"
    first = _train(tmp_path, out, tiny_warm_model_dir, "first", "trainer.total_steps=2")
    assert first["rc"] == 0, first["stderr"][-3000:]

    # Unsloth's CPU class loaded the model, the target projections in bitsandbytes NF4 4-bit, LoRA on top.
    assert first["unsloth_cpu_backend"] is True and first["unsloth_patched"], first
    quantized = {n.split(".")[-2] if n.endswith("base_layer") else n.split(".")[-1] for n in first["linear4bit"]}
    assert quantized == set(TARGETS), first["linear4bit"]
    assert len(first["linear4bit"]) == 2 * len(TARGETS)  # 2 decoder layers
    assert first["params4bit"] == len(first["linear4bit"]) and first["quant_type"] == ["nf4"]
    assert first["trainable"] and all("lora_" in n for n in first["trainable"]), first["trainable"][:5]
    # vLLM stayed out of the process (its AVX-512 extension would be probed by Unsloth otherwise).
    if importlib.util.find_spec("vllm") is not None:
        assert first["vllm_hidden"] and not first["vllm_ext_loaded"], first["vllm_ext_loaded"][:5]
        assert "vLLM is hidden from this process" in first["stderr"]

    # Two optimizer-stepping steps logged and checkpointed; the LoRA weights left their init (B = 0).
    rows = _rows(out)
    assert [r[M.STEP] for r in rows] == [1, 2]
    assert sum(r.get("actor/num_updates", 0) for r in rows) > 0, rows
    for r in rows:
        assert r["train/kept_groups"] >= 1 and M.REWARD_MEAN in r
    a2 = _adapter(out, 2)
    lora_b = [k for k in a2 if "lora_B" in k]
    assert len(lora_b) == 2 * len(TARGETS) and any(a2[k].abs().sum() > 0 for k in lora_b)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"

    # Resume: a longer run on the same output_dir continues at step 3 from the step-2 adapter.
    second = _train(tmp_path, out, tiny_warm_model_dir, "second", "trainer.total_steps=3")
    assert second["rc"] == 0
    assert second["resumed_from"].endswith("step_000002") and "resumed from" in second["stderr"]
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "second.resumed.safetensors"))
    assert set(loaded) == set(a2)
    for k in a2:
        assert torch.equal(loaded[k], a2[k]), k
    rows2 = _rows(out)
    assert [r[M.STEP] for r in rows2] == [1, 2, 3]
    assert rows2[:2] == rows  # the steps before the checkpoint are kept as they were
    a3 = _adapter(out, 3)
    if rows2[2].get("actor/num_updates", 0) > 0:
        assert any(not torch.equal(a2[k], a3[k]) for k in a2)
