"""GPU backends on a CPU machine: argument mapping against the libraries' signatures, clear errors
where a GPU package or CUDA is missing, and the vLLM engine's logic against a stand-in `vllm.LLM`.

The signatures are read from the installed package when it imports; otherwise from the names below,
copied from the pinned versions' source (vllm 0.33.0 `LLM.__init__`/`EngineArgs`/`SamplingParams`,
unsloth 2026.10.9 `FastLanguageModel.from_pretrained`/`get_peft_model`).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
import json
from types import SimpleNamespace

import pytest
import torch

from fipo_lite import checks
from fipo_lite.backends import bnb4, unsloth as unsloth_backend
from fipo_lite.config import load_config
from fipo_lite.engines import vllm as vllm_engine
from fipo_lite.engines.base import SamplingParams
from fipo_lite.errors import UserError

VLLM_LLM_KWARGS = {  # LLM.__init__ parameters + EngineArgs fields it forwards (vllm 0.33.0)
    "model", "tokenizer", "dtype", "seed", "trust_remote_code", "gpu_memory_utilization", "max_model_len", "enable_prefix_caching",
    "tensor_parallel_size", "enable_sleep_mode", "enforce_eager", "max_num_seqs", "enable_lora", "max_lora_rank", "max_loras", "quantization",
    "logprobs_mode",
}
VLLM_SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "max_tokens", "seed", "logprobs", "detokenize"}
UNSLOTH_FROM_PRETRAINED = {"model_name", "max_seq_length", "dtype", "load_in_4bit", "trust_remote_code", "random_state", "fast_inference",
                           "gpu_memory_utilization", "max_lora_rank", "training"}  # training: a load_vllm kwarg it forwards
UNSLOTH_PEFT = {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_gradient_checkpointing", "random_state"}


def _has(pkg):
    return importlib.util.find_spec(pkg) is not None


def _cfg(*overrides):
    return load_config(None, ["rollout.engine=vllm", "rollout.max_new_tokens=1024", "data.max_prompt_length=512",
                              "rollout.vllm.max_model_len=2048", *overrides])


# the engine tests' sizes: within the tiny model's 512-token context (vLLM refuses more, and so does the engine)
TINY_CONTEXT = ("rollout.vllm.max_model_len=0", "rollout.max_new_tokens=64", "data.max_prompt_length=64")


# ----------------------------------------------------------------------------- vLLM argument mapping
def test_vllm_llm_kwargs_follow_config_and_signature():
    kw = vllm_engine.vllm_llm_kwargs(_cfg("rollout.vllm.gpu_memory_utilization=0.3", "lora.r=32", "rollout.vllm.max_lora_rank=32"), "/m", cuda=True)
    assert kw["model"] == "/m" and kw["gpu_memory_utilization"] == 0.3 and kw["max_lora_rank"] == 32
    assert kw["enable_lora"] is True and kw["enable_sleep_mode"] is True and kw["max_model_len"] == 2048
    assert kw["logprobs_mode"] == "processed_logprobs"  # the sampled distribution's log-probs, as the HF engine's
    assert vllm_engine.vllm_llm_kwargs(_cfg(), "/m", cuda=False)["enable_sleep_mode"] is False  # vLLM's CPU build has no sleep mode
    assert "quantization" not in kw
    assert vllm_engine.vllm_llm_kwargs(_cfg("rollout.vllm.max_model_len=null"), "/m")["max_model_len"] == 512 + 1024  # derived
    assert vllm_engine.vllm_llm_kwargs(_cfg("rollout.vllm.quantization=bitsandbytes"), "/m")["quantization"] == "bitsandbytes"
    names = VLLM_LLM_KWARGS
    if _has("vllm"):
        import dataclasses

        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        names = set(inspect.signature(LLM.__init__).parameters) | {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(vllm_engine.vllm_llm_kwargs(_cfg("rollout.vllm.quantization=bitsandbytes"), "/m")) <= names


@pytest.mark.parametrize("override,match", [
    ("rollout.vllm.max_model_len=1000", "max_model_len"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "gpu_memory_utilization"),
    ("rollout.vllm.max_lora_rank=48", "max_lora_rank"),
    ("lora.r=128", "exceeds"),
    ("rollout.vllm.sleep_level=3", "sleep_level"),
])
def test_vllm_llm_kwargs_reject_bad_settings(override, match):
    with pytest.raises(ValueError, match=match):
        vllm_engine.vllm_llm_kwargs(_cfg(override), "/m")


def test_vllm_sampling_kwargs():
    kw = vllm_engine.vllm_sampling_kwargs(SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=-1, max_new_tokens=99, seed=3, logprobs=True))
    assert kw == dict(n=4, temperature=0.7, top_p=0.9, top_k=0, max_tokens=99, seed=3, detokenize=False, logprobs=0)
    assert "logprobs" not in vllm_engine.vllm_sampling_kwargs(SamplingParams(top_k=5))
    assert vllm_engine.vllm_sampling_kwargs(SamplingParams(top_k=5))["top_k"] == 5
    fields = VLLM_SAMPLING_FIELDS
    if _has("vllm"):
        from vllm import SamplingParams as VSP

        fields = set(VSP.__struct_fields__) if hasattr(VSP, "__struct_fields__") else set(inspect.signature(VSP).parameters)
    assert set(kw) <= fields


# ----------------------------------------------------------------------------- vLLM outputs -> Rollout
def _completion(index, ids, finish, logps=None):
    lp = None if logps is None else [{t: SimpleNamespace(logprob=x)} for t, x in zip(ids, logps)]
    return SimpleNamespace(index=index, token_ids=ids, finish_reason=finish, logprobs=lp)


def test_rollout_from_outputs_orders_and_flags():
    outs = [SimpleNamespace(outputs=[_completion(1, [7, 8], "length", [-0.5, -0.25]), _completion(0, [5, 2], "stop", [-1.0, -2.0])]),
            SimpleNamespace(outputs=[_completion(0, [9], "stop", [-0.1]), _completion(1, [4, 4, 4], "length", [-1, -1, -1])])]
    ro = vllm_engine.rollout_from_outputs(outs, [[1, 2], [3]], SamplingParams(n=2, logprobs=True))
    assert ro.prompt_index == [0, 0, 1, 1]
    assert ro.response_ids == [[5, 2], [7, 8], [9], [4, 4, 4]]
    assert ro.truncated == [False, True, False, True]
    assert ro.sampler_logprobs == [[-1.0, -2.0], [-0.5, -0.25], [-0.1], [-1.0, -1.0, -1.0]]
    assert ro.prompt_ids == [[1, 2], [1, 2], [3], [3]]
    with pytest.raises(ValueError, match="expected n=3"):
        vllm_engine.rollout_from_outputs(outs, [[1, 2], [3]], SamplingParams(n=3))
    with pytest.raises(ValueError, match="2 outputs for 1 prompts"):
        vllm_engine.rollout_from_outputs(outs, [[1]], SamplingParams(n=2))


# ----------------------------------------------------------------------------- VLLMEngine with a stand-in LLM
class FakeLLM:
    """Records calls; samples `prompt[-1] + k` tokens so the test can check the plumbing."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
        self.calls.append(("generate", lora_request))
        sp = sampling_params
        return [SimpleNamespace(outputs=[_completion(j, [p["prompt_token_ids"][-1] + j, 0][: sp.max_tokens],
                                                     "stop" if sp.max_tokens >= 2 else "length",
                                                     [-0.5] * min(2, sp.max_tokens) if sp.logprobs is not None else None)
                                         for j in range(sp.n)]) for p in prompts]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake", None))

    def collective_rpc(self, method):
        self.calls.append(("rpc", method))


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**{"logprobs": None, **kw})
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda lora_name, lora_int_id, lora_path: SimpleNamespace(name=lora_name, id=lora_int_id, path=lora_path)
    for name, mod in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(checks, "require_gpu_package", lambda pkg, what: None)


class SavingPolicy:
    def __init__(self):
        self.saved = []

    def save_adapter(self, path):
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text("{}")
        self.saved.append(path)


def test_vllm_engine_adapter_handoff_and_sleep(fake_vllm, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_engine, "_cuda", lambda cuda: True)  # sleep mode is CUDA-only
    cfg = _cfg(*TINY_CONTEXT, f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "rollout.vllm.sleep_level=2")
    eng = vllm_engine.VLLMEngine(cfg, tokenizer=None)
    assert eng.llm.kwargs["model"] == str(tiny_model_dir) and eng.llm.kwargs["enable_lora"]
    ro = eng.generate([[3, 4], [6]], SamplingParams(n=2, max_new_tokens=5, logprobs=True))
    assert ro.response_ids == [[4, 0], [5, 0], [6, 0], [7, 0]] and ro.sampler_logprobs[0] == [-0.5, -0.5]
    assert eng.llm.calls == [("generate", None), ("sleep", 2)]  # base model until the first update, then asleep
    policy = SavingPolicy()
    for _ in range(3):
        eng.sync(policy)
    eng.generate([[1]], SamplingParams(max_new_tokens=1))
    lora = eng.llm.calls[-2][1]
    assert (lora.id, lora.path) == (3, str(policy.saved[-1])) and lora.name == "policy_v3"
    assert eng.llm.calls[-4:-2] == [("wake", None), ("rpc", "reload_weights")]  # level 2 dropped the weights
    assert [p.exists() for p in policy.saved] == [False, True, True]  # older adapters are cleaned up


def test_vllm_engine_without_sleep_mode(fake_vllm, tiny_model_dir, tmp_path):
    eng = vllm_engine.VLLMEngine(_cfg(*TINY_CONTEXT, f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "rollout.vllm.enable_sleep_mode=false"), None)
    eng.generate([[1]], SamplingParams(max_new_tokens=1))
    eng.sleep()
    eng.wake()
    assert [c[0] for c in eng.llm.calls] == ["generate"]


def test_vllm_engine_unsloth_shares_the_model(fake_vllm, tmp_path):
    llm = FakeLLM()
    model = SimpleNamespace(fast_generate=llm.generate, load_lora=lambda path: ("lora", path))
    eng = vllm_engine.VLLMEngine(_cfg("model.backend=unsloth", f"output_dir={tmp_path}"), None, model=model)
    eng.sync(SavingPolicy())
    eng.generate([[2]], SamplingParams(max_new_tokens=3))
    assert llm.calls == [("generate", ("lora", str(tmp_path / "rollout_adapters" / "v000001")))]  # never sleeps
    with pytest.raises(ValueError, match="fast_inference"):
        vllm_engine.VLLMEngine(_cfg("model.backend=unsloth", f"output_dir={tmp_path}"), None, model=object())


# ----------------------------------------------------------------------------- bnb4 / unsloth
def test_bnb_config_kwargs_match_transformers():
    from transformers import BitsAndBytesConfig

    kw = bnb4.bnb_config_kwargs(load_config(None, ["model.dtype=float32"]))
    # compute in model.dtype: float32 on a CPU, so the trainer computes what a float32 sampler does
    assert kw == dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    assert bnb4.bnb_config_kwargs(load_config(None, ["model.dtype=float16"]))["bnb_4bit_compute_dtype"] is torch.float16
    assert bnb4.bnb_config_kwargs(load_config(None, ["model.dtype=bfloat16"]))["bnb_4bit_compute_dtype"] is torch.bfloat16
    assert set(kw) <= set(inspect.signature(BitsAndBytesConfig).parameters)
    if _has("bitsandbytes"):
        assert BitsAndBytesConfig(**kw).bnb_4bit_quant_type == "nf4"


def test_unsloth_kwargs():
    cfg = _cfg("model.backend=unsloth", "model.max_seq_length=4096", "lora.r=8", "lora.alpha=16", "seed=5", "model.dtype=bfloat16")
    kw = unsloth_backend.unsloth_from_pretrained_kwargs(cfg, "/m")
    assert kw["load_in_4bit"] and kw["fast_inference"] and kw["max_seq_length"] == 4096 and kw["random_state"] == 5
    assert kw["dtype"] is torch.bfloat16 and kw["gpu_memory_utilization"] == cfg.rollout.vllm.gpu_memory_utilization
    assert "fast_inference" not in unsloth_backend.unsloth_from_pretrained_kwargs(_cfg("rollout.engine=hf"), "/m")
    pk = unsloth_backend.unsloth_peft_kwargs(cfg)
    assert pk["r"] == 8 and pk["lora_alpha"] == 16 and pk["use_gradient_checkpointing"] == "unsloth"
    assert unsloth_backend.unsloth_peft_kwargs(_cfg("model.offload_gradients=false"))["use_gradient_checkpointing"] is True
    names_fp, names_peft = UNSLOTH_FROM_PRETRAINED, UNSLOTH_PEFT
    if _has("unsloth") and torch.cuda.is_available():
        from unsloth import FastLanguageModel

        names_fp = set(inspect.signature(FastLanguageModel.from_pretrained).parameters)
        names_peft = set(inspect.signature(FastLanguageModel.get_peft_model).parameters)
    assert set(kw) <= names_fp and set(pk) <= names_peft
    with pytest.raises(ValueError, match="max_seq_length"):
        unsloth_backend.unsloth_from_pretrained_kwargs(_cfg("model.max_seq_length=1024"), "/m")


@pytest.mark.parametrize("package,what", [("bitsandbytes", "model.backend=bnb4"), ("unsloth", "model.backend=unsloth"),
                                          ("vllm", "rollout.engine=vllm")])
def test_gpu_stack_packages_fail_clearly_when_missing(package, what, tmp_path):
    """Each package of the gpu extra on its own: a clear error where it is missing, a skip where it is installed."""
    if _has(package):
        pytest.skip(f"{package} is installed here")
    from fipo_lite.backends import load_model
    from fipo_lite.trainer import make_optimizer

    with pytest.raises(ImportError, match=r"gpu extra"):
        if package == "vllm":
            vllm_engine.VLLMEngine(_cfg(f"output_dir={tmp_path}"), None)
        else:
            load_model(load_config(None, [what]))
    if package == "bitsandbytes":
        with pytest.raises(ImportError, match=r"gpu extra"):
            make_optimizer([torch.nn.Parameter(torch.zeros(2))], load_config(None, ["trainer.optimizer=paged_adamw_8bit"]))


def test_gpu_measure_dry_run(tmp_path):
    """The measurement script's whole code path on CPU with a tiny random Qwen2 (the GPU run is not possible here)."""
    import importlib.util as iu
    import json
    from pathlib import Path

    spec = iu.spec_from_file_location("gpu_measure", Path(__file__).resolve().parents[1] / "scripts" / "gpu_measure.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "m.json"
    assert mod.main(["--dry-run", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["train"]["loss_finite"] and case["train"]["tokens_per_s"] > 0
    assert case["sample"]["sequences"] == 8 and 0 < case["sample"]["new_tokens"] <= 64  # --sample-batch sequences, whatever the micro-batch
    assert 0 < case["train"]["predicted_static_gb"] < case["train"]["predicted_peak_gb"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            mod.main(["--out", str(out)])


def test_vllm_engine_hands_vllm_absolute_adapter_paths(fake_vllm, tiny_model_dir, tmp_path, monkeypatch):
    """vLLM resolves a relative LoRA path against its own working directory, then tries the hub."""
    monkeypatch.chdir(tmp_path)
    eng = vllm_engine.VLLMEngine(_cfg(*TINY_CONTEXT, f"model.path={tiny_model_dir}", "output_dir=runs/relative"), None)
    eng.sync(SavingPolicy())
    assert eng.lora_request.path == str(tmp_path / "runs" / "relative" / "rollout_adapters" / "v000001")


def test_vllm_context_longer_than_the_model_is_one_error(fake_vllm, tiny_model_dir, tmp_path):
    """A derived max_model_len beyond max_position_embeddings: named before vLLM starts (it would raise a
    pydantic traceback), with the keys to change."""
    limit = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    cfg = _cfg("rollout.vllm.max_model_len=0", f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "data.max_prompt_length=64", f"rollout.max_new_tokens={limit}")
    with pytest.raises(UserError, match=r"data.max_prompt_length \+ rollout.max_new_tokens = 64 \+ \d+ = \d+ exceeds the model's context"):
        vllm_engine.VLLMEngine(cfg, tokenizer=None)
    cfg = _cfg("rollout.vllm.max_model_len=0", f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", f"rollout.max_new_tokens={limit - 64}", "data.max_prompt_length=64")
    assert vllm_engine.VLLMEngine(cfg, tokenizer=None).llm.kwargs["max_model_len"] == limit  # exactly the context is fine
