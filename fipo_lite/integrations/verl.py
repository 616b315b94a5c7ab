"""fipo_lite's objective as a verl policy loss, under the upstream recipe's name `future_kl`.

verl imports this module in every process (driver and Ray workers) through the `verl.plugins`
entry point that fipo_lite installs, so `actor_rollout_ref.actor.policy_loss.loss_mode=future_kl`
works with stock verl (tested against verl 0.9.1's `core_algos` API) and runs the upstream
multi-node recipe on our exact O(B*L) Future-KL instead of the O(B*L^2) chunked one.

FIPO knobs are read, first found wins, from: the actor's `policy_loss` config (the upstream FIPO
fork adds `decay_rate`, `future_kl_*` and `safety_thresh` there); the JSON in the environment
variable FIPO_LITE_VERL_KNOBS (stock verl: pass it to the workers through Ray's runtime_env);
the published 32B defaults. Clip ranges come from the actor config as for verl's "vanilla" loss.

    python -m fipo_lite.integrations.verl --config configs/qwen2.5-32b.yaml   # launcher overrides
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from ..future_kl import TAU
from ..objective import CLIP_HIGH, DEFAULT_AGG, LOSS_AGG_MODES, from_recipe, policy_loss

NAME = "future_kl"
ENV = "FIPO_LITE_VERL_KNOBS"
# The upstream recipe's knobs and the published Qwen2.5-32B values (spec section 12).
DEFAULT_KNOBS: dict[str, Any] = {
    "decay_rate": TAU, "chunk_size": None, "future_kl_start": "include_current", "future_kl_window": -1,
    "future_kl_average": False, "future_kl_clip_ratio": 0.2, "future_kl_clip_high_only": True, "safety_thresh": 10.0,
}


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        try:
            value = cfg.get(key, default)
            return default if value is None else value
        except Exception:  # noqa: BLE001 - dataclass configs without that key
            pass
    return getattr(cfg, key, default)


def resolve_knobs(config) -> dict[str, Any]:
    """The FIPO knobs for this call: actor policy_loss config > $FIPO_LITE_VERL_KNOBS > defaults."""
    knobs = dict(DEFAULT_KNOBS)
    env = os.environ.get(ENV)
    if env:
        try:
            extra = json.loads(env)
        except json.JSONDecodeError as e:
            raise ValueError(f"${ENV} is not valid JSON: {e.msg}") from None
        unknown = sorted(set(extra) - set(DEFAULT_KNOBS))
        if unknown:
            raise ValueError(f"${ENV} has unknown keys {unknown}; valid: {sorted(DEFAULT_KNOBS)}")
        knobs.update(extra)
    pl = _get(config, "policy_loss")
    for key in DEFAULT_KNOBS:
        value = _get(pl, key)
        if value is not None:
            knobs[key] = value
    return knobs


def policy_loss_kwargs(config, loss_agg_mode: str) -> dict[str, Any]:
    """verl actor config + knobs -> fipo_lite.policy_loss keyword arguments."""
    kwargs = from_recipe(**resolve_knobs(config))
    clip = _get(config, "clip_ratio", 0.2)
    kwargs["clip_low"] = float(_get(config, "clip_ratio_low", clip))
    kwargs["clip_high"] = float(_get(config, "clip_ratio_high", clip))
    kwargs["dual_clip_c"] = float(_get(config, "clip_ratio_c", 3.0))
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"future_kl supports loss_agg_mode in {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    kwargs["loss_agg_mode"] = loss_agg_mode
    return kwargs


def _denominator(config, loss_agg_mode: str) -> tuple[Optional[float], Optional[int]]:
    """verl's global batch info -> (per-rank denominator, loss scale factor).

    verl divides by the global count and multiplies by dp_size so that gradient averaging over
    ranks gives the global token-mean; `denominator = global_count / dp_size` is the same thing.
    (Upstream counts the global batch's response tokens before invalidated sequences are dropped;
    we follow verl's count here, as the kept count would need a cross-rank reduction.)
    """
    info = _get(config, "global_batch_info", None) or {}
    dp = float(info.get("dp_size", 1) or 1)
    count = info.get("batch_num_tokens") if loss_agg_mode == "token-mean" else info.get("global_batch_size")
    den = None if count is None else float(count) / dp
    scale = info.get("loss_scale_factor")
    return den, (int(scale) if scale else None)


def verl_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                     rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's PolicyLossFn signature -> (pg_loss, {"actor/...": float})."""
    kwargs = policy_loss_kwargs(config, loss_agg_mode)
    den, scale = _denominator(config, loss_agg_mode)
    loss, m = policy_loss(old_log_prob, log_prob, advantages, response_mask, denominator=den,
                          max_response_length=scale, is_weights=rollout_is_weights, **kwargs)
    metrics = {"actor/pg_clipfrac": m["clip_frac"], "actor/ppo_kl": m["policy_kl"], "actor/pg_clipfrac_lower": m["dual_clip_frac"]}
    metrics.update({f"actor/fipo/{k}": v for k, v in m.items() if k not in ("clip_frac", "policy_kl", "dual_clip_frac", "loss")})
    return loss, metrics


def register(name: str = NAME):
    """Register `verl_policy_loss` in verl's policy-loss registry (needs verl importable)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    return register_policy_loss(name)(verl_policy_loss)


# ----------------------------------------------------------------------------- launcher translation
def recipe_knobs(cfg) -> dict[str, Any]:
    """A fipo_lite config's algorithm section as the upstream recipe's knobs."""
    a = cfg.algorithm
    if a.loss_mode != "fipo":
        raise ValueError(f"the verl plug-in is the FIPO loss; algorithm.loss_mode is {a.loss_mode!r} "
                         "(use verl's own 'vanilla' loss for DAPO/GRPO)")
    if a.fkl_clip_low == a.fkl_clip_high == 1.0:
        raise ValueError("influence clip [1.0, 1.0] (f = 1: FIPO reduced to DAPO) has no upstream equivalent: the release "
                         "reads future_kl_clip_ratio=0 as no clipping at all; for that control run verl's 'vanilla' loss")
    if a.fkl_clip_low == 0.0 and a.fkl_clip_high == 10.0:
        ratio, high_only = 0.0, True
    elif a.fkl_clip_low == 1.0:
        ratio, high_only = a.fkl_clip_high - 1.0, True
    elif abs((1.0 - a.fkl_clip_low) - (a.fkl_clip_high - 1.0)) < 1e-9:
        ratio, high_only = a.fkl_clip_high - 1.0, False
    else:
        raise ValueError(f"influence clip [{a.fkl_clip_low}, {a.fkl_clip_high}] has no upstream equivalent "
                         "(upstream supports [1, 1+r], [1-r, 1+r] and no clip)")
    knobs = {"decay_rate": float(a.tau), "future_kl_start": a.start, "future_kl_window": int(a.window),
             "future_kl_average": bool(a.average), "future_kl_clip_ratio": round(float(ratio), 6),
             "future_kl_clip_high_only": high_only, "safety_thresh": float(a.safety_thresh)}
    return knobs


# The recipe runs `python3 -m recipe.dapo.main_dapo` of the upstream fork (verl 0.5.0.dev): its DAPO
# trainer generates batches of `data.gen_batch_size` prompts, drops groups whose `filter_groups.metric`
# is constant, and stops with an error after `max_num_gen_batches` batches without a full training batch.
# Stock verl 0.9.1 has no `recipe/` package; its `verl.trainer.main_ppo` (V1 trainer) does dynamic
# sampling itself (`algorithm.filter_groups.enable/metric`) but refills the batch group by group, so it
# ignores `max_num_gen_batches` (with a warning) and, with filtering on, `data.gen_batch_size`; it reads the DAPO reward manager
# and the overlong buffer under `reward.*` (the legacy `reward_model.*` keys of the recipe are only
# migrated by its fully-async entry point). STOCK_KEYS renames the recipe's keys for stock verl.
ENTRY = {"fork": "recipe.dapo.main_dapo", "stock": "verl.trainer.main_ppo"}
OVERLONG = "+reward.reward_kwargs.overlong_buffer_cfg"  # verl 0.9.1 experimental/reward_loop/reward_manager/dapo.py
STOCK_KEYS = {
    "reward_model.reward_manager": "reward.reward_manager.name",
    "reward_model.overlong_buffer.enable": f"{OVERLONG}.enable",
    "reward_model.overlong_buffer.len": f"{OVERLONG}.len",
    "reward_model.overlong_buffer.penalty_factor": f"{OVERLONG}.penalty_factor",
}


def _select(cfg, key: str, default=None):
    """A config key this fipo_lite version may lack (or leave null) -> `default`."""
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def recipe_overrides(cfg) -> dict[str, Any]:
    """A fipo_lite run config -> the recipe's Hydra settings, under the upstream run script's key names.

    The generation batch is the loop's own (`config.gen_batch_size`: 4 x the training batch unless set,
    as the recipe's gen_prompt_bsz).
    """
    from ..config import gen_batch_size, warmup_steps

    a, t, r, d, rw = cfg.algorithm, cfg.trainer, cfg.rollout, cfg.data, cfg.reward
    if t.lr_scheduler != "constant":  # not translated: verl would run its constant schedule without a word
        raise ValueError(f"trainer.lr_scheduler={t.lr_scheduler} has no translation to verl's optimizer keys here; use "
                         "trainer.lr_scheduler=constant, or set actor_rollout_ref.actor.optim's scheduler in the verl command yourself")
    if _select(cfg, "reward.function") or _select(cfg, "reward.functions"):  # verl would score with its DAPO reward instead
        raise ValueError("reward.function / reward.functions have no translation to verl's reward here (its custom_reward_function "
                         "is called as compute_score(data_source, solution_str, ground_truth, extra_info)); set "
                         "custom_reward_function.path and .name in the verl command yourself")
    actor, rollout = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    gen_batch = gen_batch_size(cfg)
    out = {
        "algorithm.adv_estimator": "grpo", "algorithm.norm_adv_by_std_in_grpo": a.norm_adv_by_std,
        "algorithm.use_kl_in_reward": False,
        f"{actor}.use_kl_loss": bool(a.kl_coef), f"{actor}.kl_loss_coef": a.kl_coef,
        f"{actor}.policy_loss.loss_mode": NAME, f"{actor}.clip_ratio_low": a.clip_low,
        f"{actor}.clip_ratio_high": a.clip_high if a.clip_high is not None else CLIP_HIGH,
        f"{actor}.clip_ratio_c": a.dual_clip_c, f"{actor}.loss_agg_mode": a.loss_agg_mode or DEFAULT_AGG["fipo"],
        f"{actor}.ppo_mini_batch_size": t.ppo_mini_batch_size, f"{actor}.ppo_epochs": t.ppo_epochs,
        f"{actor}.optim.lr": t.lr, f"{actor}.optim.lr_warmup_steps": warmup_steps(t),
        f"{actor}.optim.weight_decay": t.weight_decay, f"{actor}.grad_clip": t.grad_clip, f"{actor}.entropy_coeff": 0,
        f"{rollout}.n": r.n, f"{rollout}.temperature": r.temperature, f"{rollout}.top_p": r.top_p, f"{rollout}.top_k": r.top_k,
        f"{rollout}.val_kwargs.temperature": t.eval_temperature, f"{rollout}.val_kwargs.top_p": t.eval_top_p,
        f"{rollout}.val_kwargs.top_k": r.top_k, f"{rollout}.val_kwargs.do_sample": True, f"{rollout}.val_kwargs.n": t.eval_k,
        "data.train_batch_size": t.train_batch_size, "data.gen_batch_size": gen_batch,
        "data.max_prompt_length": d.max_prompt_length, "data.max_response_length": r.max_new_tokens,
        "algorithm.filter_groups.enable": a.filter_groups.enable, "algorithm.filter_groups.metric": a.filter_groups.metric,
        "algorithm.filter_groups.max_num_gen_batches":
            _select(cfg, "algorithm.filter_groups.max_num_gen_batches", 10),
        "reward_model.reward_manager": "dapo", "reward_model.overlong_buffer.enable": rw.overlong.enable,
        "reward_model.overlong_buffer.len": rw.overlong.buffer_len,
        "reward_model.overlong_buffer.penalty_factor": rw.overlong.penalty_factor,
        "trainer.total_training_steps": t.total_steps, "trainer.test_freq": t.eval_every, "trainer.save_freq": t.save_every,
        "actor_rollout_ref.model.path": cfg.model.path,
        # the run's trackers and names (verl's Tracking knows the same backends), overlong prompts as the loop drops them
        "trainer.logger": _hydra_list(_select(cfg, "trainer.logger", ["console"])),
        "trainer.project_name": _select(cfg, "trainer.project", "fipo_lite"),
        "trainer.experiment_name": _select(cfg, "trainer.run_name") or Path(cfg.output_dir).name,
        "data.filter_overlong_prompts": bool(_select(cfg, "data.filter_overlong_prompts", False)),
    }
    for split, key in (("train", "data.train_files"), ("val", "data.val_files")):
        files = _parquet_files(d[split])
        if files:  # verl reads verl-format parquet only (untranslated() names the rest)
            out.update({key: files[0] if len(files) == 1 else _hydra_list(files), "data.prompt_key": "prompt", "data.truncation": "left"})
    return out


def _hydra_list(items) -> str:
    return "[" + ",".join(str(x) for x in items) + "]"


def _is_parquet(spec) -> bool:
    return isinstance(spec, str) and spec.endswith(".parquet")


def _parquet_files(value) -> list[str]:
    from ..data import data_specs

    return [s for s in data_specs(value) if _is_parquet(s)]


def untranslated(cfg) -> list[str]:
    """What of the config the printed command leaves out and the user must supply: data that is not a
    verl-format parquet file (a synthetic task, JSONL, a `datasets` dataset)."""
    from ..data import data_specs

    notes = []
    for split, key in (("train", "data.train_files"), ("val", "data.val_files")):
        for spec in data_specs(cfg.data[split]):
            if not _is_parquet(spec):
                notes.append(f"data.{split}={spec!r} is not a verl-format .parquet file: it is left out of {key}; "
                             "write it as one (prompt as chat messages, reward_model.ground_truth) and add it there")
    return notes


def launcher_overrides(cfg, target: str = "stock") -> list[str]:
    """A fipo_lite run config -> Hydra overrides for the recipe's entry point (see ENTRY).

    target="fork" (the upstream FIPO repository): the run script's keys, with the FIPO knobs as
    `+...policy_loss.*` keys. target="stock" (verl 0.9.1 from PyPI): keys renamed by STOCK_KEYS,
    and the FIPO knobs travel to every Ray worker as the JSON in $FIPO_LITE_VERL_KNOBS (runtime_env).
    """
    if target not in ENTRY:
        raise ValueError(f"target must be one of {sorted(ENTRY)}, got {target!r}")
    settings = recipe_overrides(cfg)
    knobs = recipe_knobs(cfg)
    if target == "fork":
        settings.update({f"+actor_rollout_ref.actor.policy_loss.{k}": v for k, v in knobs.items()})
    else:
        settings = {STOCK_KEYS.get(k, k): v for k, v in settings.items()}
        settings[f"{OVERLONG}.log"] = False
        settings["+reward.reward_kwargs.max_resp_len"] = cfg.rollout.max_new_tokens  # main_dapo passes it in the fork
        settings[f"+ray_kwargs.ray_init.runtime_env.env_vars.{ENV}"] = f"'{json.dumps(knobs, separators=(',', ':'))}'"
    return [f"{k}={v}" for k, v in settings.items()]


def main(argv: list[str] | None = None) -> int:
    from ..config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m fipo_lite.integrations.verl",
                                 description="Print verl launcher overrides for a fipo_lite config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--target", default="stock", choices=["stock", "fork"], help="verl from PyPI, or the upstream FIPO fork")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        lines = launcher_overrides(cfg, args.target)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in untranslated(cfg):
        print(f"[fipo_lite] note: {note}", file=sys.stderr)
    # shell-quoted: after the shell, Hydra gets each override as written (the knobs' JSON inside Hydra's quotes)
    print(f"python3 -m {ENTRY[args.target]} \\\n    " + " \\\n    ".join(shlex.quote(x) for x in lines))
    return 0


try:  # imported by verl's plugin discovery: register right away
    register()
except ImportError:  # verl not installed: the functions above still work on plain tensors
    pass

if __name__ == "__main__":
    sys.exit(main())
