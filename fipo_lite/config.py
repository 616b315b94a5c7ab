"""Typed run configuration: YAML file + dotted overrides, merged and validated by OmegaConf.

The dataclasses below list every knob. A default or a set of allowed values that belongs to
another module is read from it, never repeated: the objective's defaults from `policy_loss`'s
signature, tau from `future_kl.TAU`, backends/engines/dtypes/devices/loss modes/starts/aggregations
and vLLM's LoRA ranks from their modules, `reward.name` from the reward registry at load time (so
rewards added with `rewards.register` are accepted). An unknown key is an error naming the closest
valid keys; a wrong type is an error naming the key; cross-field rules (e.g. LoRA rank vs the
sampler's maximum) are checked here so a CPU user sees them too.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .allocator import KEEP_FREED_MEMORY
from .backends import BACKENDS
from .backends.hf import DEVICES, DTYPES
from .engines import ENGINES
from .engines.hf import LEAN_DECODE, MERGE_LORA
from .engines.vllm import VLLM_LORA_RANKS, max_model_len
from .errors import UserError
from .future_kl import STARTS
from .objective import DEFAULT_AGG, LOSS_AGG_MODES, MODES, policy_loss, resolve_clip_high
from .packed import PACKED_MATMUL
from .policy import LEAN_FORWARD
from .rewards import RewardError, absolute_spec, check_entries, reward_names
from .tasks import FORM_TASKS
from .tiny import TinyModelConfig
from .tracking import LOGGERS

# policy_loss's keyword defaults are the algorithm section's defaults (one home for each number).
_LOSS = {k: p.default for k, p in inspect.signature(policy_loss).parameters.items() if p.default is not p.empty}
FILTER_METRICS = ("acc", "score")  # the trainer's dynamic sampling keeps groups whose metric varies
ON_CAP = ("error", "partial")  # what dynamic sampling does when max_num_gen_batches is reached
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
LR_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_min_lr")  # trainer.lr_scheduler


@dataclass
class ModelConfig:
    path: str = "tiny"  # "tiny" (built here, cached), a local HF directory, a hub name, a .gguf file (converted once,
    # cached) or a packaged GGUF model of fipo_lite.gguf_models.PACKAGED ("smollm2-135m-instruct")
    backend: str = "hf"  # hf | bnb4 | unsloth
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None
    cache_dir: str = ".cache/fipo_lite"  # where the tiny model is built and GGUF models are converted
    max_seq_length: int = 4096  # unsloth
    offload_gradients: bool = True  # unsloth's "unsloth" gradient checkpointing (activation offload)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    enable: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # Start from an existing (e.g. SFT) adapter: a peft adapter folder (save_pretrained), a checkpoint or a run directory
    # of this kit. Its r, alpha, dropout and target_modules are the run's: a value above that differs from the adapter's
    # and from the default is refused (by key); the path is stored absolute. hf and bnb4 backends.
    adapter_path: Optional[str] = None


@dataclass
class VllmConfig:
    gpu_memory_utilization: float = 0.5
    max_model_len: Optional[int] = None  # None/0: data.max_prompt_length + rollout.max_new_tokens
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = True
    max_lora_rank: int = 64  # one of vLLM's LoRA ranks, >= lora.r
    enforce_eager: bool = False
    dtype: str = "bfloat16"
    quantization: Optional[str] = None  # e.g. "bitsandbytes": 4-bit sampler weights (unsloth backend: Unsloth configures its own vLLM)
    sleep_level: int = 1  # vLLM sleep: 1 offloads weights to CPU and drops the KV cache, 2 drops both
    max_num_seqs: int = 256  # sequences decoded at once


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    n: int = 8  # samples per prompt (the group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    generation_batch_size: int = 64  # sequences per HF engine call
    merge_lora: str = "auto"  # HF engine: sample from a LoRA-merged copy (auto: CPU, unquantized); see engines/hf.py
    lean_decode: str = "auto"  # HF engine: decode steps through lean.py (auto: CPU, plain/merged weights it supports)
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class DataConfig:
    # synthetic:NAME, a .jsonl file, a verl-format .parquet file, or a `datasets` dataset (the datasets extra):
    # hf:NAME[:SPLIT] (a hub dataset) or a mapping of load_dataset arguments ({path: json, data_files: x.jsonl, split: train})
    train: Any = "synthetic:addition3"
    # One spec as data.train, or a list of them ([aime-2024.parquet, math500.jsonl]): each set gets data.val_size problems
    # and its own val/<name>/avg_at_k, pass_at_k, cons_at_k (name: the set's one data_source, else the file stem) besides
    # the pooled val/avg_at_k, ...
    val: Any = "synthetic:addition3"
    prompt_key: str = "prompt"  # the column of the prompt (a string or chat messages), as verl's data.prompt_key
    answer_key: Optional[str] = None  # the column of the ground truth; None: reward_model.ground_truth, ground_truth or answer
    train_size: int = 4096  # synthetic training problems (files: all rows)
    val_size: int = 64  # held-out prompts (synthetic val draws from a disjoint seed); 0 only with trainer.eval_every=0
    max_prompt_length: int = 512  # prompt tokens (chat template and system prompt included)
    # Leave out the prompts longer than max_prompt_length, with a count on the console (verl's filter_overlong_prompts);
    # false: such a prompt stops the run. A set with no prompt left is an error either way.
    filter_overlong_prompts: bool = True
    shuffle: bool = True
    # A system message put before every prompt (train and val) that has none of its own; None: none
    system_prompt: Optional[str] = None
    # Extra variables for the tokenizer's chat template, e.g. {enable_thinking: false} for Qwen3
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OverlongConfig:
    enable: bool = False
    buffer_len: int = 16
    penalty_factor: float = 1.0


@dataclass
class RewardFunctionConfig:
    function: str = ""  # PATH.py:NAME (a function in a Python file) or a built-in reward (exact, auto, ...)
    weight: float = 1.0  # the total reward is the weighted sum
    name: Optional[str] = None  # metric reward/<name>/mean; None: the function's (or built-in's) name


@dataclass
class RewardConfig:
    name: str = "auto"  # auto (by data_source) | exact | dapo_math | boxed | any name given to rewards.register
    # Your own reward: PATH.py:NAME, called as NAME(response, ground_truth, *, prompt=, data_source=, extra=) (the keywords
    # only if its signature names them) and returning a number, (score, correct, pred) or {"score": ..., "acc": ..., "pred": ...}.
    # A relative PATH is taken from the working directory and stored absolute. Set, it replaces reward.name.
    function: Optional[str] = None
    # Several rewards, summed with weights (TRL's reward_funcs + reward_weights), each logged as reward/<name>/mean:
    # [{function: PATH.py:NAME | a built-in, weight: 1.0, name: ...}, ...]. The first one's `correct` is the accuracy
    # (train/accuracy, val avg@k, dynamic sampling's acc). Set, it replaces reward.name (name a built-in in the list instead).
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    timeout_s: float = 5.0  # a reward call past this scores 0 and is counted; <= 0: score in this process, no limit (debugging)
    num_workers: int = 1  # reward processes (a runaway call is killed with its process)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)


@dataclass
class FilterGroupsConfig:
    enable: bool = True  # DAPO dynamic sampling: train only on groups whose metric varies
    metric: str = "acc"  # acc | score
    max_num_gen_batches: int = 10  # generation batches per step before on_cap applies; 0: no limit (recipe: 10)
    # At the cap: "error" stops the run with a message saying what to change (the recipe's behaviour);
    # "partial" trains on the groups kept so far (fewer than train_batch_size; metric train/partial_batch = 1).
    on_cap: str = "error"


@dataclass
class AlgorithmConfig:
    loss_mode: str = _LOSS["mode"]  # fipo | dapo | grpo
    norm_adv_by_std: bool = True  # False: Dr. GRPO mean-only advantages
    clip_low: float = _LOSS["clip_low"]
    clip_high: Optional[float] = _LOSS["clip_high"]  # None: objective.CLIP_HIGH = 0.28 (fipo/dapo), clip_low (grpo)
    dual_clip_c: float = _LOSS["dual_clip_c"]
    tau: float = _LOSS["tau"]  # future_kl.TAU = 32
    fkl_clip_low: float = _LOSS["fkl_clip_low"]
    fkl_clip_high: float = _LOSS["fkl_clip_high"]
    safety_thresh: float = _LOSS["safety_thresh"]
    start: str = _LOSS["start"]
    window: int = _LOSS["window"]
    average: bool = _LOSS["average"]
    mask_dual_clip: bool = _LOSS["mask_dual_clip"]
    invalidate_dual_clipped: bool = _LOSS["invalidate_dual_clipped"]
    loss_agg_mode: Optional[str] = _LOSS["loss_agg_mode"]  # None: the mode's default (objective.DEFAULT_AGG)
    kl_coef: float = _LOSS["kl_coef"]  # > 0: k3 KL to the frozen reference (the base model without adapter), any loss_mode
    tis_cap: Optional[float] = None  # truncated importance sampling against sampler log-probs (None: off)
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)


@dataclass
class TrainerConfig:
    total_steps: int = 40
    train_batch_size: int = 16  # prompts per step (the groups trained on)
    # Prompts sampled per generation batch of dynamic sampling; 0: 4 x train_batch_size (the recipe's
    # gen_prompt_bsz). With algorithm.filter_groups.enable=false every step samples train_batch_size prompts.
    gen_batch_size: int = 0
    ppo_mini_batch_size: int = 8  # prompts per optimizer step
    micro_batch_size: int = 32  # sequences per forward/backward
    max_tokens_per_micro_batch: int = 0  # >0: pack micro-batches by a token budget instead
    ppo_epochs: int = 1
    lr: float = 1e-3
    warmup_steps: int = 2
    # null: warmup_steps; a fraction of total_steps (rounded up, as TRL's warmup_ratio) that replaces it:
    # with warmup_ratio set, warmup_steps must stay at its default (both set is refused)
    warmup_ratio: Optional[float] = None
    # lr over training steps: "constant" ramps linearly over the warmup (1/W, 2/W, ... of lr) and then
    # holds; the others are transformers.get_scheduler's (TRL's), warmup from 0 over the warmup, then
    # decaying over trainer.total_steps (cosine_with_min_lr: down to min_lr_ratio x lr)
    lr_scheduler: str = "constant"
    min_lr_ratio: float = 0.1  # cosine_with_min_lr only
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit (bitsandbytes)
    logprob_chunk_size: int = 1024  # tokens per log-softmax chunk
    share_prompt_forward: bool = True  # run each group's shared prompt once in the update (policy.py); off with unsloth
    lean_forward: str = "auto"  # the update's LoRA forward through lean.py (auto: CPU, a model it supports); see policy.py
    eval_every: int = 10  # 0: never; the warm start (step 0) and the last step are evaluated too
    eval_k: int = 8
    eval_temperature: float = 1.0  # paper's evaluation protocol: temperature 1.0, top-p 0.7
    eval_top_p: float = 0.7
    save_every: int = 10  # 0: never
    keep_checkpoints: int = 2  # 0: keep all
    resume: str = "auto"  # auto | never | PATH to a checkpoint dir
    progress: bool = True
    # OUTPUT_DIR/rollouts/step_NNNNNN.jsonl: each step's sampled completions (the trained groups first),
    # and OUTPUT_DIR/eval/step_NNNNNN.jsonl: each evaluation's samples (see samples.py)
    log_rollouts: bool = True
    log_rollouts_max: int = 512  # rows per step in rollouts/ (0: every sample); evaluations write all theirs
    print_samples_every: int = 10  # print a few of the step's completions to the console every N steps (0: never)
    print_samples_num: int = 2  # how many (one per group, the trained groups first)
    # Experiment trackers, a list of tracking.LOGGERS (console | tensorboard | wandb | mlflow; "a,b" or one name
    # also work); metrics.jsonl is always written. console: the progress bar's figures (a line per step with
    # progress=false). tensorboard / wandb / mlflow are optional extras; a resumed run continues its tracker runs.
    logger: Any = field(default_factory=lambda: ["console"])
    project: str = "fipo_lite"  # W&B project, MLflow experiment
    run_name: Optional[str] = None  # W&B / MLflow run name; None: the name of output_dir
    num_threads: int = 0  # torch CPU threads; 0: leave torch's default
    keep_freed_memory: str = "auto"  # glibc keeps freed big blocks for reuse (auto: CPU runs); see allocator.py
    packed_matmul: str = "auto"  # float32 CPU matmuls of lean.py and the LM head against oneDNN-packed weights; see packed.py
    allow_config_change: bool = False  # resume even though training-relevant keys changed (recorded in the run dir)


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# Keys a resumed run may change without asking: they decide how long, how often, where and how fast
# it runs, never what is trained or what a logged metric means. Every other key (model, LoRA shape,
# loss and its knobs, data, seed, optimizer, lr, batch and group sizes, sampling, rewards, and the
# evaluation protocol: eval_k, eval_temperature/top_p, data.val/val_size) stops a resume unless
# trainer.allow_config_change=true. micro_batch_size and max_tokens_per_micro_batch are here because
# gradients are accumulated exactly over micro-batches (memory knobs, like gradient checkpointing);
# thread counts, devices and engine memory settings change float rounding and random streams, not the
# experiment. The run directory records every change with the step it took effect (see rundir.py).
RESUME_SAFE_KEYS = frozenset({
    "output_dir", "trainer.total_steps", "trainer.eval_every", "trainer.save_every", "trainer.keep_checkpoints",
    "trainer.resume", "trainer.progress", "trainer.log_rollouts", "trainer.log_rollouts_max", "trainer.print_samples_every",
    "trainer.print_samples_num", "trainer.logger", "trainer.project", "trainer.run_name", "trainer.num_threads",
    "trainer.keep_freed_memory", "trainer.packed_matmul", "trainer.allow_config_change",
    "trainer.logprob_chunk_size", "trainer.share_prompt_forward", "trainer.lean_forward", "trainer.micro_batch_size", "trainer.max_tokens_per_micro_batch",
    "model.device", "model.cache_dir", "model.gradient_checkpointing", "model.offload_gradients", "model.attn_implementation",
    "rollout.generation_batch_size", "rollout.merge_lora", "rollout.lean_decode", "rollout.vllm.gpu_memory_utilization", "rollout.vllm.enable_prefix_caching",
    "rollout.vllm.enable_sleep_mode", "rollout.vllm.sleep_level", "rollout.vllm.max_num_seqs", "rollout.vllm.enforce_eager",
    "rollout.vllm.tensor_parallel_size", "reward.num_workers",
})



def choices() -> dict[str, tuple]:
    """The allowed values of every key that has a fixed set, each read from the module that owns it
    (reward names at call time, so registered rewards count)."""
    return {
        "model.backend": BACKENDS,
        "model.dtype": tuple(DTYPES),
        "model.device": DEVICES,
        "model.tiny.task": FORM_TASKS,
        "rollout.engine": ENGINES,
        "rollout.merge_lora": MERGE_LORA,
        "rollout.lean_decode": LEAN_DECODE,
        "trainer.lean_forward": LEAN_FORWARD,
        "trainer.keep_freed_memory": KEEP_FREED_MEMORY,
        "trainer.packed_matmul": PACKED_MATMUL,
        "rollout.vllm.max_lora_rank": VLLM_LORA_RANKS,
        "reward.name": reward_names(),
        "algorithm.loss_mode": MODES,
        "algorithm.start": STARTS,
        "algorithm.loss_agg_mode": (None, *LOSS_AGG_MODES),
        "algorithm.filter_groups.metric": FILTER_METRICS,
        "algorithm.filter_groups.on_cap": ON_CAP,
        "trainer.optimizer": OPTIMIZERS,
        "trainer.lr_scheduler": LR_SCHEDULERS,
    }


class ConfigError(UserError):
    """A bad config key or value; the message names it."""


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items() if isinstance(node, (dict, DictConfig)) else []:
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, (dict, DictConfig)):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    valid = _all_keys(OmegaConf.structured(RunConfig))
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # fall back to the keys under the same parent
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        close = [k for k in valid if k.startswith(parent) and "." not in k[len(parent):]][:8]
    return ConfigError(f"unknown config key '{key}'; closest valid keys: {', '.join(close)}")


def _check_sections(base: DictConfig, other: Any, where: str, prefix: str = "") -> None:
    """A config (and each of its sections) is a mapping: a YAML list, or `trainer: 5`, is named here
    (OmegaConf's own merge error names neither the key nor the file)."""
    if not isinstance(other, (dict, DictConfig)):
        what = f"config section '{prefix[:-1]}'" if prefix else "a config"
        raise ConfigError(f"{what} must be a mapping of keys to values ({where}), got {_kind(other)}: {_short(other)}")
    for k, v in other.items():
        if not isinstance(k, str) or k not in base:  # unknown keys: the merge names them
            continue
        b = base[k]
        if isinstance(b, DictConfig) and v is not None:
            if not isinstance(v, (dict, DictConfig)):
                raise ConfigError(f"config key '{prefix}{k}' is a section and must be a mapping of its keys ({where}), "
                                  f"got {_short(v)}; e.g. '{prefix}{k}: {{{next(iter(b), 'key')}: ...}}'")
            _check_sections(b, v, where, f"{prefix}{k}.")


def _short(value: Any) -> str:
    text = repr(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, (list, tuple, ListConfig)):
        return "a list"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    _check_sections(base, other, where)
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        if getattr(e, "object_type", None) is RewardFunctionConfig:  # inside a list entry OmegaConf loses the path
            raise ConfigError(f"unknown key '{key}' in an entry of reward.functions ({where}); valid keys: "
                              f"{', '.join(RewardFunctionConfig.__dataclass_fields__)}") from None
        raise _unknown_key_error(str(key)) from None
    except ValidationError as e:
        msg = (e.msg or str(e)).splitlines()[0]
        raise ConfigError(f"bad value for config key '{e.full_key}' ({where}): {msg}" if e.full_key else f"invalid config ({where}): {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config ({where}): {e}") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. trainer.total_steps=20)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Defaults <- YAML file <- dotted overrides, then validated."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as e:  # yaml errors
            raise ConfigError(f"cannot parse config file {p}: {e}") from None
        cfg = _merge(cfg, file_cfg, str(p))
    if overrides:
        cfg = _merge(cfg, parse_overrides(list(overrides)), "command line")
    validate(cfg)
    derive_defaults(cfg)
    return cfg


# algorithm.tis_cap when the sampler's weights are not the trainer's (vLLM quantizing on its own)
SAMPLER_MISMATCH_TIS_CAP = 2.0


def derive_defaults(cfg: DictConfig) -> None:
    """Defaults that depend on other keys, said out loud. With rollout.vllm.quantization set (and not
    Unsloth, which shares its weights with vLLM), vLLM quantizes the base itself and samples from a
    different policy than the trainer's: every update is off-policy by that gap, so truncated importance
    sampling is turned on unless the config sets algorithm.tis_cap."""
    r = cfg.rollout
    if r.engine == "vllm" and r.vllm.quantization and cfg.model.backend != "unsloth" and cfg.algorithm.tis_cap is None:
        cfg.algorithm.tis_cap = SAMPLER_MISMATCH_TIS_CAP
        warnings.warn(f"rollout.vllm.quantization={r.vllm.quantization}: vLLM samples from its own quantization of the base, "
                      f"not the trainer's weights, so sampler and trainer log-probs differ; algorithm.tis_cap set to "
                      f"{SAMPLER_MISMATCH_TIS_CAP} (truncated importance sampling). Set algorithm.tis_cap to choose another cap, "
                      "or leave rollout.vllm.quantization unset (a 4-bit trainer's base then reaches vLLM dequantized).", stacklevel=2)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _usable_dir(path: str) -> bool:
    """The path is a directory, or can become one: its nearest existing ancestor is a directory."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            return q.is_dir()
    return True


def _check_loggers(cfg: DictConfig) -> None:
    """trainer.logger as a list of tracker names (a string "a,b" or one name is accepted and turned into one)."""
    value = cfg.trainer.logger
    names = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
    if not isinstance(names, (list, ListConfig)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"config key 'trainer.logger' is {_short(value)}; must be a list of tracker names from {list(LOGGERS)}")
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise ConfigError(f"config key 'trainer.logger' has {bad[0]!r}; valid values: {list(LOGGERS)}")
    cfg.trainer.logger = list(dict.fromkeys(names))


_ADAPTER_SHAPE = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}  # ours: peft's


def _take_adapter_shape(cfg: DictConfig) -> None:
    """lora.adapter_path: the adapter's shape becomes the lora section's (a key set to something else is refused)."""
    lo = cfg.lora
    if not lo.adapter_path:
        return
    from .checkpoint import CheckpointError, adapter_dir

    for ok, msg in [(lo.enable, "lora.adapter_path needs lora.enable=true"),
                    (cfg.model.backend in ("hf", "bnb4"), f"lora.adapter_path works with model.backend hf or bnb4, not {cfg.model.backend!r}")]:
        if not ok:
            raise ConfigError(msg)
    try:
        folder = adapter_dir(lo.adapter_path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    saved = json.loads((folder / "adapter_config.json").read_text())
    default = LoraConfig()
    for ours, theirs in _ADAPTER_SHAPE.items():
        value = saved.get(theirs)
        if value is None or (ours == "target_modules" and not isinstance(value, list)):
            continue  # a regex target (peft allows one) stays peft's business
        if ours == "target_modules":
            value = sorted(value)
        current = sorted(lo[ours]) if ours == "target_modules" else lo[ours]
        if current not in (value, getattr(default, ours) if ours != "target_modules" else sorted(default.target_modules)):
            raise ConfigError(f"config key 'lora.{ours}' is {_short(current)} but the adapter at lora.adapter_path={lo.adapter_path!r} "
                              f"has {theirs}={_short(value)}; leave lora.{ours} unset (the adapter's shape is used)")
        lo[ours] = value
    lo.adapter_path = str(Path(lo.adapter_path).resolve())


def _data_spec_ok(v: Any) -> bool:
    """A data spec: a non-empty string, or load_dataset arguments with a string 'path'."""
    return (isinstance(v, str) and bool(v)) or (isinstance(v, (dict, DictConfig)) and isinstance(v.get("path"), str))


def _check_val(cfg: DictConfig) -> None:
    """data.train: one data spec; data.val: a spec, or a non-empty list of specs."""
    specs = ("synthetic:NAME, .jsonl, .parquet, hf:NAME[:SPLIT] or load_dataset arguments with 'path'")
    if not _data_spec_ok(cfg.data.train):
        raise ConfigError(f"config key 'data.train' is {_short(cfg.data.train)}; must be a data spec ({specs})")
    value = cfg.data.val
    if isinstance(value, (list, ListConfig)):
        ok = len(value) > 0 and all(_data_spec_ok(v) for v in value)
    else:
        ok = _data_spec_ok(value)
    if not ok:
        raise ConfigError(f"config key 'data.val' is {_short(value)}; must be a data spec ({specs}) or a non-empty list of them")


def validate(cfg: DictConfig) -> None:
    _check_loggers(cfg)
    _check_val(cfg)
    _take_adapter_shape(cfg)
    for key, allowed in choices().items():
        value = OmegaConf.select(cfg, key)
        if value in ("True", "False") and value.lower() in allowed:  # `key=false` / `key: false` arrive as a bool
            value = value.lower()
            OmegaConf.update(cfg, key, value)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; valid values: {[a for a in allowed]}")
    t, a, r, v = cfg.trainer, cfg.algorithm, cfg.rollout, cfg.rollout.vllm
    vllm = r.engine == "vllm"
    ol = cfg.reward.overlong
    # (key, its value, whether it is allowed, the allowed range): a refused value is named with its key and range.
    # NaN compares false, so every rule is written as what IS allowed; all of them run before the cross-field
    # checks below (which may divide by or compare these values).
    ranges = [
        ("trainer.train_batch_size", t.train_batch_size, t.train_batch_size >= 1, ">= 1"),
        ("trainer.ppo_mini_batch_size", t.ppo_mini_batch_size, t.ppo_mini_batch_size >= 1, ">= 1"),
        ("trainer.micro_batch_size", t.micro_batch_size, t.micro_batch_size >= 1, ">= 1"),
        ("trainer.total_steps", t.total_steps, t.total_steps >= 0, ">= 0"),
        ("trainer.ppo_epochs", t.ppo_epochs, t.ppo_epochs >= 1, ">= 1 (epochs over each batch; 0 would train nothing)"),
        ("trainer.lr", t.lr, _finite(t.lr) and t.lr > 0, "a finite number > 0"),
        ("trainer.weight_decay", t.weight_decay, _finite(t.weight_decay) and t.weight_decay >= 0, "a finite number >= 0"),
        ("trainer.grad_clip", t.grad_clip, not math.isnan(t.grad_clip), "a number (<= 0 or inf: no clipping)"),
        ("trainer.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("trainer.warmup_ratio", t.warmup_ratio, t.warmup_ratio is None or (_finite(t.warmup_ratio) and 0 <= t.warmup_ratio <= 1),
         "null (use trainer.warmup_steps) or a number in [0, 1]"),
        ("trainer.log_rollouts_max", t.log_rollouts_max, t.log_rollouts_max >= 0, ">= 0 (0: every sample)"),
        ("trainer.print_samples_every", t.print_samples_every, t.print_samples_every >= 0, ">= 0 (0: never)"),
        ("trainer.print_samples_num", t.print_samples_num, t.print_samples_num >= 1, ">= 1"),
        ("trainer.min_lr_ratio", t.min_lr_ratio, _finite(t.min_lr_ratio) and 0 <= t.min_lr_ratio <= 1, "a number in [0, 1]"),
        ("trainer.gen_batch_size", t.gen_batch_size, t.gen_batch_size >= 0, ">= 0 (0: 4 x trainer.train_batch_size)"),
        ("trainer.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0: never)"),
        ("trainer.save_every", t.save_every, t.save_every >= 0, ">= 0 (0: never)"),
        ("trainer.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 0, ">= 0 (0: keep all)"),
        ("trainer.eval_k", t.eval_k, t.eval_k >= 1, ">= 1"),
        ("trainer.eval_temperature", t.eval_temperature, _finite(t.eval_temperature) and t.eval_temperature > 0, "a finite number > 0"),
        ("trainer.eval_top_p", t.eval_top_p, 0 < t.eval_top_p <= 1, "in (0, 1]"),
        ("rollout.n", r.n, r.n >= 1, ">= 1"),
        ("rollout.max_new_tokens", r.max_new_tokens, r.max_new_tokens >= 1, ">= 1"),
        ("rollout.top_p", r.top_p, 0 < r.top_p <= 1, "in (0, 1]"),
        ("rollout.temperature", r.temperature, _finite(r.temperature) and r.temperature > 0, "a finite number > 0"),
        ("lora.r", cfg.lora.r, cfg.lora.r >= 1, ">= 1"),
        ("lora.alpha", cfg.lora.alpha, cfg.lora.alpha > 0, "> 0"),
        ("lora.dropout", cfg.lora.dropout, 0 <= cfg.lora.dropout < 1, "in [0, 1)"),
        ("lora.target_modules", cfg.lora.target_modules, len(cfg.lora.target_modules) > 0, "a non-empty list of module names"),
        ("data.train_size", cfg.data.train_size, cfg.data.train_size >= 1, ">= 1"),
        ("data.val_size", cfg.data.val_size, cfg.data.val_size >= 1 or (cfg.data.val_size == 0 and t.eval_every == 0),
         ">= 1 (0 only with trainer.eval_every=0: no evaluation)"),
        ("reward.timeout_s", cfg.reward.timeout_s, _finite(cfg.reward.timeout_s), "a finite number (<= 0: score in this process, no time limit)"),
        ("reward.num_workers", cfg.reward.num_workers, cfg.reward.num_workers >= 1, ">= 1"),
        ("reward.overlong.buffer_len", ol.buffer_len, not ol.enable or 0 < ol.buffer_len <= r.max_new_tokens,
         f"in (0, rollout.max_new_tokens={r.max_new_tokens}] with reward.overlong.enable=true"),
        ("reward.overlong.penalty_factor", ol.penalty_factor, _finite(ol.penalty_factor) and ol.penalty_factor >= 0, "a finite number >= 0"),
        ("algorithm.clip_low", a.clip_low, _finite(a.clip_low) and 0 <= a.clip_low < 1, "a finite number in [0, 1)"),
        ("algorithm.clip_high", a.clip_high, a.clip_high is None or (_finite(a.clip_high) and a.clip_high >= 0),
         "null (the loss mode's default) or a finite number >= 0"),
        ("algorithm.dual_clip_c", a.dual_clip_c, _finite(a.dual_clip_c) and a.dual_clip_c > 1, "a finite number > 1"),
        ("algorithm.tau", a.tau, _finite(a.tau) and a.tau > 0, "a finite number > 0"),
        ("algorithm.fkl_clip_low", a.fkl_clip_low, _finite(a.fkl_clip_low) and a.fkl_clip_low >= 0, "a finite number >= 0"),
        ("algorithm.fkl_clip_high", a.fkl_clip_high, _finite(a.fkl_clip_high) and a.fkl_clip_high > 0, "a finite number > 0"),
        ("algorithm.safety_thresh", a.safety_thresh, _finite(a.safety_thresh) and a.safety_thresh >= 0, "a finite number >= 0"),
        ("algorithm.window", a.window, a.window == -1 or a.window > 0, "-1 (no window) or > 0"),
        ("algorithm.kl_coef", a.kl_coef, _finite(a.kl_coef) and a.kl_coef >= 0, "a finite number >= 0 (0: no KL to the reference)"),
        ("algorithm.tis_cap", a.tis_cap, a.tis_cap is None or (_finite(a.tis_cap) and a.tis_cap > 0), "null (off) or a finite number > 0"),
        ("algorithm.filter_groups.max_num_gen_batches", a.filter_groups.max_num_gen_batches, a.filter_groups.max_num_gen_batches >= 0,
         ">= 0 (0: no limit)"),
    ]
    for key, value, ok, allowed in ranges:
        if not ok:
            raise ConfigError(f"config key '{key}' is {_short(value)}; must be {allowed}")
    checks = [
        (t.warmup_ratio is None or t.warmup_steps == TrainerConfig.warmup_steps,
         f"trainer.warmup_ratio={t.warmup_ratio} and trainer.warmup_steps={t.warmup_steps} both set the warmup; set one of them "
         f"(with warmup_ratio, leave warmup_steps at its default {TrainerConfig.warmup_steps})"),
        (t.train_batch_size % t.ppo_mini_batch_size == 0, "trainer.train_batch_size must be a multiple of trainer.ppo_mini_batch_size"),
        (a.fkl_clip_low <= a.fkl_clip_high, f"need algorithm.fkl_clip_low <= algorithm.fkl_clip_high, got {a.fkl_clip_low} > {a.fkl_clip_high}"),
        (_usable_dir(cfg.output_dir), f"config key 'output_dir' is {cfg.output_dir!r}; must be a directory (or a path to create one), "
                                      "not an existing file or a path through one"),
        (not vllm or cfg.lora.enable, "rollout.engine=vllm samples with the policy's LoRA adapter and needs lora.enable=true "
                                       "(full fine-tuning cannot hand its weights to vLLM; use rollout.engine=hf)"),
        (not vllm or not cfg.lora.enable or cfg.lora.r <= v.max_lora_rank,
         f"lora.r={cfg.lora.r} exceeds rollout.vllm.max_lora_rank={v.max_lora_rank}; raise it to one of "
         f"{[k for k in VLLM_LORA_RANKS if k >= cfg.lora.r]} or lower lora.r"),
        (not vllm or max_model_len(cfg) >= cfg.data.max_prompt_length + r.max_new_tokens,
         f"rollout.vllm.max_model_len={v.max_model_len} < data.max_prompt_length + rollout.max_new_tokens = "
         f"{cfg.data.max_prompt_length + r.max_new_tokens}; raise it, or leave it unset to derive it"),
        (t.resume in ("auto", "never") or Path(t.resume).exists(), f"trainer.resume must be auto, never or an existing checkpoint path, got {t.resume!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    _check_reward_functions(cfg.reward)


def _check_reward_functions(rw: DictConfig) -> None:
    """reward.function(s): their shape (rewards.check_entries; files are loaded when the run starts) and
    each file's path made absolute, so every process of the run, and every ablate subprocess, loads one file."""
    try:
        check_entries(rw)
    except RewardError as e:
        raise ConfigError(str(e)) from None
    if rw.function:
        rw.function = absolute_spec(rw.function)
    for entry in rw.functions:
        entry.function = absolute_spec(entry.function)


def gen_batch_size(cfg: DictConfig) -> int:
    """Prompts per generation batch: trainer.gen_batch_size, 0 = 4 x train_batch_size (the recipe's
    gen_prompt_bsz); without dynamic sampling a step samples exactly train_batch_size prompts."""
    t = cfg.trainer
    if not cfg.algorithm.filter_groups.enable:
        return t.train_batch_size
    return t.gen_batch_size or 4 * t.train_batch_size


def warmup_steps(t: DictConfig) -> int:
    """The lr warmup in steps: trainer.warmup_ratio x total_steps rounded up (TRL's rule) when the ratio
    is set, else trainer.warmup_steps. Float noise is rounded off first (0.1 x 30 is 3 steps, not 4)."""
    return math.ceil(round(t.warmup_ratio * t.total_steps, 9)) if t.warmup_ratio is not None else t.warmup_steps


def resolve_loss_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config ({dotted key: value}, every key present) with the loss's null defaults replaced by
    what the loss uses: algorithm.clip_high (objective.resolve_clip_high) and algorithm.loss_agg_mode
    (objective.DEFAULT_AGG). A resume compares these, so null and the value it stands for are one config."""
    out = dict(flat)
    mode = out.get("algorithm.loss_mode")
    if mode in MODES:
        if out.get("algorithm.clip_high") is None and out.get("algorithm.clip_low") is not None:
            out["algorithm.clip_high"] = resolve_clip_high(mode, out["algorithm.clip_low"], None)
        if out.get("algorithm.loss_agg_mode") is None:
            out["algorithm.loss_agg_mode"] = DEFAULT_AGG[mode]
    return out


def policy_loss_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The algorithm section as keyword arguments of `fipo_lite.policy_loss`."""
    a = cfg.algorithm
    return dict(
        mode=a.loss_mode, clip_low=a.clip_low, clip_high=a.clip_high, dual_clip_c=a.dual_clip_c, tau=a.tau,
        fkl_clip_low=a.fkl_clip_low, fkl_clip_high=a.fkl_clip_high, safety_thresh=a.safety_thresh, start=a.start,
        window=a.window, average=a.average, loss_agg_mode=a.loss_agg_mode, mask_dual_clip=a.mask_dual_clip,
        invalidate_dual_clipped=a.invalidate_dual_clipped, kl_coef=a.kl_coef,
    )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
