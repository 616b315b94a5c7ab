"""One home per default and allowed value, and the cross-field rules the config checks at load time."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from fipo_lite import rewards
from fipo_lite.backends import BACKENDS
from fipo_lite.config import ConfigError, choices, load_config
from fipo_lite.data import encode_prompt
from fipo_lite.engines.vllm import VLLM_LORA_RANKS, max_model_len
from fipo_lite.future_kl import TAU
from fipo_lite.objective import MODES, policy_loss

VLLM = ["rollout.engine=vllm"]
TINY_CPU = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def test_defaults_and_choices_come_from_their_modules():
    cfg = load_config()
    loss_defaults = {k: p.default for k, p in inspect.signature(policy_loss).parameters.items() if p.default is not p.empty}
    for key in ("clip_low", "clip_high", "dual_clip_c", "tau", "fkl_clip_low", "fkl_clip_high", "safety_thresh", "start",
                "window", "average", "mask_dual_clip", "invalidate_dual_clipped", "loss_agg_mode", "kl_coef"):
        assert cfg.algorithm[key] == loss_defaults[key], key
    assert cfg.algorithm.tau == TAU == 32.0 and cfg.algorithm.loss_mode == loss_defaults["mode"]
    c = choices()
    assert c["model.backend"] is BACKENDS and c["algorithm.loss_mode"] is MODES and c["rollout.vllm.max_lora_rank"] is VLLM_LORA_RANKS


def test_registered_reward_is_a_valid_reward_name():
    with pytest.raises(ConfigError, match="reward.name"):
        load_config(None, ["reward.name=test_config_rules_reward"])
    rewards.register("test_config_rules_reward")(lambda response, truth: (1.0, True, None))
    try:
        assert load_config(None, ["reward.name=test_config_rules_reward"]).reward.name == "test_config_rules_reward"
    finally:
        del rewards.REWARDS["test_config_rules_reward"]


@pytest.mark.parametrize("overrides,match", [
    (["lora.enable=false"], r"rollout.engine=vllm .* needs lora.enable=true"),
    (["lora.r=128"], r"lora.r=128 exceeds rollout.vllm.max_lora_rank=64; raise it to one of \[128, 256, 320, 512\]"),
    (["rollout.vllm.max_lora_rank=48"], r"rollout.vllm.max_lora_rank.*valid values"),
    (["rollout.vllm.max_model_len=100"], r"rollout.vllm.max_model_len=100 < data.max_prompt_length \+ rollout.max_new_tokens = 576"),
])
def test_vllm_cross_field_rules_fail_at_load_time(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, VLLM + overrides)


def test_vllm_rules_hold_only_with_vllm_and_max_model_len_is_derived():
    load_config(None, ["lora.enable=false", "lora.r=128"])  # the HF engine has neither limit
    cfg = load_config(None, VLLM + ["data.max_prompt_length=100", "rollout.max_new_tokens=28"])
    assert cfg.rollout.vllm.max_model_len is None and max_model_len(cfg) == 128
    assert max_model_len(load_config(None, VLLM + ["rollout.vllm.max_model_len=4096"])) == 4096


def test_encode_prompt_takes_a_list_or_a_batch_encoding():
    """transformers 4.x returns ids from apply_chat_template(tokenize=True), 5.x a BatchEncoding."""
    from transformers import BatchEncoding

    class Tok:
        def __init__(self, as_dict):
            self.as_dict = as_dict

        def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
            ids = [ord(c) for m in messages for c in m["content"]]
            return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)}) if self.as_dict else ids

    msgs = [{"role": "user", "content": "1+2"}]
    assert encode_prompt(Tok(True), msgs) == encode_prompt(Tok(False), msgs) == [49, 43, 50]


def test_true_false_settings_accept_yaml_and_command_line_booleans(tmp_path):
    """`rollout.merge_lora=false` (and `merge_lora: false` in YAML) arrive as booleans: they mean "false"."""
    cfg = load_config(None, ["rollout.merge_lora=false", "rollout.lean_decode=true", "trainer.lean_forward=false"])
    assert (cfg.rollout.merge_lora, cfg.rollout.lean_decode, cfg.trainer.lean_forward) == ("false", "true", "false")
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  merge_lora: false\ntrainer:\n  lean_forward: true\n")
    cfg = load_config(path)
    assert (cfg.rollout.merge_lora, cfg.trainer.lean_forward) == ("false", "true")
    with pytest.raises(ConfigError, match=r"'trainer.lean_forward' is 'sometimes'; valid values: \['auto', 'true', 'false'\]"):
        load_config(None, ["trainer.lean_forward=sometimes"])


def test_a_sampler_that_quantizes_on_its_own_turns_on_tis():
    """vLLM quantizing the base itself samples another policy than the trainer's: said, and TIS on."""
    from fipo_lite.config import SAMPLER_MISMATCH_TIS_CAP

    with pytest.warns(UserWarning, match="tis_cap set to"):
        cfg = load_config(None, [*VLLM, "rollout.vllm.quantization=bitsandbytes", "model.backend=bnb4"])
    assert cfg.algorithm.tis_cap == SAMPLER_MISMATCH_TIS_CAP
    assert load_config(None, [*VLLM, "rollout.vllm.quantization=bitsandbytes", "algorithm.tis_cap=5"]).algorithm.tis_cap == 5
    assert load_config(None, [*VLLM, "model.backend=bnb4"]).algorithm.tis_cap is None  # NF4 reaches vLLM dequantized: one policy


def test_tiny_task_must_have_answer_forms():
    with pytest.raises(ConfigError, match="model.tiny.task"):
        load_config(None, ["model.tiny.task=mul2x1"])
    assert load_config(None, ["model.tiny.task=modsum20"]).model.tiny.task == "modsum20"


# ----------------------------------------------------------------------------- value ranges (issue 19)
REFUSED = [
    # (override, the key, the value as the message prints it, the allowed range)
    ("trainer.ppo_epochs=0", "trainer.ppo_epochs", "0", ">= 1"),
    ("trainer.ppo_mini_batch_size=0", "trainer.ppo_mini_batch_size", "0", ">= 1"),  # was a ZeroDivisionError
    ("trainer.lr=nan", "trainer.lr", "nan", "a finite number > 0"),
    ("trainer.lr=-0.01", "trainer.lr", "-0.01", "a finite number > 0"),
    ("trainer.lr=inf", "trainer.lr", "inf", "a finite number > 0"),
    ("trainer.lr=0", "trainer.lr", "0.0", "a finite number > 0"),
    ("trainer.weight_decay=-1", "trainer.weight_decay", "-1.0", "a finite number >= 0"),
    ("trainer.grad_clip=nan", "trainer.grad_clip", "nan", "a number"),
    ("trainer.eval_k=0", "trainer.eval_k", "0", ">= 1"),
    ("trainer.eval_temperature=0", "trainer.eval_temperature", "0.0", "a finite number > 0"),
    ("trainer.eval_temperature=inf", "trainer.eval_temperature", "inf", "a finite number > 0"),
    ("trainer.eval_every=-1", "trainer.eval_every", "-1", ">= 0 (0: never)"),
    ("trainer.save_every=-1", "trainer.save_every", "-1", ">= 0 (0: never)"),
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints", "-1", ">= 0 (0: keep all)"),
    ("rollout.temperature=nan", "rollout.temperature", "nan", "a finite number > 0"),
    ("lora.r=0", "lora.r", "0", ">= 1"),
    ("lora.alpha=0", "lora.alpha", "0", "> 0"),
    ("lora.dropout=1.5", "lora.dropout", "1.5", "in [0, 1)"),
    ("lora.dropout=1", "lora.dropout", "1.0", "in [0, 1)"),
    ("lora.dropout=nan", "lora.dropout", "nan", "in [0, 1)"),
    ("lora.target_modules=[]", "lora.target_modules", "[]", "a non-empty list"),
    ("data.val_size=-1", "data.val_size", "-1", ">= 1"),
    ("data.val_size=0", "data.val_size", "0", "0 only with trainer.eval_every=0"),
    ("reward.timeout_s=nan", "reward.timeout_s", "nan", "a finite number"),
    ("reward.timeout_s=inf", "reward.timeout_s", "inf", "a finite number"),
    ("reward.num_workers=0", "reward.num_workers", "0", ">= 1"),
    ("algorithm.clip_low=1", "algorithm.clip_low", "1.0", "in [0, 1)"),
    ("algorithm.clip_low=-0.1", "algorithm.clip_low", "-0.1", "in [0, 1)"),
    ("algorithm.clip_low=nan", "algorithm.clip_low", "nan", "in [0, 1)"),
    ("algorithm.clip_high=-0.1", "algorithm.clip_high", "-0.1", "null (the loss mode's default) or a finite number >= 0"),
    ("algorithm.clip_high=inf", "algorithm.clip_high", "inf", "a finite number >= 0"),
    ("algorithm.tis_cap=0", "algorithm.tis_cap", "0.0", "null (off) or a finite number > 0"),
    ("algorithm.tis_cap=nan", "algorithm.tis_cap", "nan", "null (off) or a finite number > 0"),
    ("algorithm.tis_cap=inf", "algorithm.tis_cap", "inf", "null (off) or a finite number > 0"),
    ("algorithm.kl_coef=-0.01", "algorithm.kl_coef", "-0.01", "a finite number >= 0"),
    ("algorithm.kl_coef=nan", "algorithm.kl_coef", "nan", "a finite number >= 0"),
    ("algorithm.safety_thresh=-1", "algorithm.safety_thresh", "-1.0", "a finite number >= 0"),
    ("algorithm.safety_thresh=inf", "algorithm.safety_thresh", "inf", "a finite number >= 0"),
    ("algorithm.safety_thresh=nan", "algorithm.safety_thresh", "nan", "a finite number >= 0"),
    ("algorithm.dual_clip_c=inf", "algorithm.dual_clip_c", "inf", "a finite number > 1"),
    ("algorithm.dual_clip_c=1", "algorithm.dual_clip_c", "1.0", "a finite number > 1"),
    ("algorithm.fkl_clip_high=inf", "algorithm.fkl_clip_high", "inf", "a finite number > 0"),
    ("algorithm.fkl_clip_high=nan", "algorithm.fkl_clip_high", "nan", "a finite number > 0"),
    ("algorithm.tau=inf", "algorithm.tau", "inf", "a finite number > 0"),
    ("algorithm.tau=nan", "algorithm.tau", "nan", "a finite number > 0"),
    ("algorithm.tau=0", "algorithm.tau", "0.0", "a finite number > 0"),
]


@pytest.mark.parametrize("override,key,value,allowed", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_value_that_makes_a_wrong_run_is_refused_naming_key_value_and_range(override, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_CPU, [override])
    msg = str(e.value)
    assert f"config key '{key}' is {value}; must be " in msg and allowed in msg, msg


@pytest.mark.parametrize("overrides,match", [
    (["reward.overlong.enable=true", "reward.overlong.buffer_len=0"], r"'reward.overlong.buffer_len' is 0; must be in \(0, rollout.max_new_tokens=64\]"),
    (["reward.overlong.enable=true", "reward.overlong.buffer_len=65"], r"'reward.overlong.buffer_len' is 65; must be in \(0, rollout.max_new_tokens=64\]"),
    (["algorithm.fkl_clip_low=1.3"], r"need algorithm.fkl_clip_low <= algorithm.fkl_clip_high, got 1.3 > 1.2"),
])
def test_cross_field_ranges(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY_CPU, overrides)


@pytest.mark.parametrize("overrides", [
    ["trainer.eval_every=0", "trainer.save_every=0", "trainer.keep_checkpoints=0"],  # never / never / keep all
    ["trainer.eval_every=0", "data.val_size=0"],  # no evaluation, no held-out set
    ["reward.timeout_s=0"], ["reward.timeout_s=-1"],  # score in this process with no time limit (debugging)
    ["reward.overlong.enable=false", "reward.overlong.buffer_len=0"],  # unused while overlong shaping is off
    ["algorithm.clip_low=0", "algorithm.clip_high=0", "algorithm.kl_coef=0", "algorithm.safety_thresh=0"],
    ["algorithm.clip_high=null", "algorithm.tis_cap=null"], ["algorithm.tis_cap=2"],
    ["trainer.grad_clip=0"], ["trainer.grad_clip=inf"],  # no clipping
    ["algorithm.fkl_clip_low=0"], ["lora.dropout=0.05"],
])
def test_boundary_values_with_a_meaning_are_kept(overrides):
    load_config(TINY_CPU, overrides)


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for path in (f, f / "run"):
        with pytest.raises(ConfigError, match=rf"config key 'output_dir' is '{path}'; must be a directory"):
            load_config(TINY_CPU, [f"output_dir={path}"])
    load_config(TINY_CPU, [f"output_dir={tmp_path / 'new' / 'run'}"])  # created by the run


@pytest.mark.parametrize("text,match", [
    ("trainer: 5\n", r"config key 'trainer' is a section and must be a mapping of its keys \(.*bad.yaml\), got 5"),
    ("model:\n  tiny: 3\n", r"config key 'model.tiny' is a section and must be a mapping of its keys \(.*bad.yaml\), got 3"),
    ("- 1\n- 2\n", r"a config must be a mapping of keys to values \(.*bad.yaml\), got a list: \[1, 2\]"),
])
def test_a_yaml_file_of_the_wrong_shape_is_a_config_error(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_resume_compares_a_null_loss_default_with_the_value_it_stands_for():
    """clip_high: null and clip_high: 0.28 (fipo) are one config, so a resume with either is no change."""
    from omegaconf import OmegaConf

    from fipo_lite.rundir import config_changes

    def flat(*o):
        return OmegaConf.to_container(load_config(None, list(o)))

    base = flat()
    assert config_changes(base, flat("algorithm.clip_high=0.28", "algorithm.loss_agg_mode=token-mean")) == {}
    assert config_changes(flat("algorithm.loss_mode=grpo"), flat("algorithm.loss_mode=grpo", "algorithm.clip_high=0.2")) == {}
    assert config_changes(base, flat("algorithm.clip_high=0.3")) == {"algorithm.clip_high": [0.28, 0.3]}
    assert config_changes(flat("algorithm.loss_mode=grpo"), flat("algorithm.loss_mode=grpo", "algorithm.clip_high=0.28")) == {
        "algorithm.clip_high": [0.2, 0.28]}


@pytest.mark.parametrize("mode", MODES)
def test_the_kl_term_enters_the_loss_in_every_mode(mode):
    """kl_coef is a property of the loss (spec 8, verl's use_kl_loss), so the trainer computes the
    reference log-probs whenever kl_coef > 0, whatever the loss mode."""
    import torch

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(2, 5, generator=g)
    logp = old + 0.05 * torch.randn(2, 5, generator=g)
    adv = torch.tensor([[1.0] * 5, [-1.0] * 5])
    mask = torch.ones(2, 5, dtype=torch.bool)
    ref = old - 0.5
    plain, _ = policy_loss(old, logp, adv, mask, mode=mode)
    with_kl, m = policy_loss(old, logp, adv, mask, mode=mode, ref_logp=ref, kl_coef=0.1)
    assert m["kl_ref"] > 0 and with_kl.item() > plain.item()
