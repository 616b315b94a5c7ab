"""One home per default and allowed value, and the cross-field rules the config checks at load time."""

from __future__ import annotations

import inspect

import pytest

from fipo_lite import rewards
from fipo_lite.backends import BACKENDS
from fipo_lite.config import ConfigError, choices, load_config
from fipo_lite.data import encode_prompt
from fipo_lite.engines.vllm import VLLM_LORA_RANKS, max_model_len
from fipo_lite.future_kl import TAU
from fipo_lite.objective import MODES, policy_loss

VLLM = ["rollout.engine=vllm"]


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
