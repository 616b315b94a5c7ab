"""The verl plug-in: registration through verl's plugin discovery, equality with fipo_lite.policy_loss
and (with influence weights pinned to 1) with verl's own vanilla loss, knob resolution, launcher overrides."""

from __future__ import annotations

import inspect
import json
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import fipo_lite
from fipo_lite.config import load_config
from fipo_lite.integrations import verl as plugin

ROOT = Path(__file__).resolve().parents[1]


def _tensors(B=4, L=12, seed=0, spikes=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g) * 2
    logp = old + torch.randn(B, L, generator=g) * 0.2
    if spikes:
        logp[0, :2] += 3.0  # two ratios above c on a negative-advantage row: FIPO drops the row
    adv = torch.randn(B, 1, generator=g).expand(B, L).contiguous()
    adv[0] = -1.0
    mask = torch.arange(L)[None] < torch.tensor([L, L - 3, 5, 1])[:, None]
    return old, logp, adv, mask


def _actor_config(**policy_loss):
    return OmegaConf.create({
        "clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 10.0,
        "policy_loss": {"loss_mode": "future_kl", **policy_loss}, "global_batch_info": {},
    })


def test_loss_equals_fipo_lite_policy_loss(monkeypatch):
    monkeypatch.delenv(plugin.ENV, raising=False)
    old, logp, adv, mask = _tensors()
    cfg = _actor_config(decay_rate=16, future_kl_clip_ratio=0.2, future_kl_clip_high_only=False, safety_thresh=3.0)
    loss, metrics = plugin.verl_policy_loss(old, logp, adv, mask, "token-mean", cfg)
    ref, m = fipo_lite.policy_loss(old, logp, adv, mask, tau=16, fkl_clip_low=0.8, fkl_clip_high=1.2, safety_thresh=3.0,
                                   clip_low=0.2, clip_high=0.28, dual_clip_c=10.0)
    assert loss.item() == ref.item()
    assert metrics["actor/pg_clipfrac"] == m["clip_frac"] and metrics["actor/ppo_kl"] == m["policy_kl"]
    assert metrics["actor/pg_clipfrac_lower"] == m["dual_clip_frac"]
    assert metrics["actor/fipo/invalid_seq_frac"] > 0 and "actor/fipo/influence_mean" in metrics


def test_knob_precedence_and_errors(monkeypatch):
    monkeypatch.setenv(plugin.ENV, json.dumps({"decay_rate": 8, "safety_thresh": 3.0}))
    k = plugin.resolve_knobs(_actor_config(decay_rate=64))
    assert k["decay_rate"] == 64 and k["safety_thresh"] == 3.0 and k["future_kl_clip_ratio"] == 0.2
    monkeypatch.setenv(plugin.ENV, json.dumps({"decay": 8}))
    with pytest.raises(ValueError, match="unknown keys \\['decay'\\]"):
        plugin.resolve_knobs(_actor_config())
    monkeypatch.setenv(plugin.ENV, "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        plugin.resolve_knobs(_actor_config())
    monkeypatch.delenv(plugin.ENV)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        plugin.verl_policy_loss(*_tensors(), "token-sum", _actor_config())


verl_core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (see .ci/run)")


def test_registered_under_upstream_name_by_verl_plugin_discovery():
    import verl  # noqa: F401  - verl's import loads the `verl.plugins` entry points, ours included

    assert verl_core.get_policy_loss_fn("future_kl") is plugin.verl_policy_loss
    ours = list(inspect.signature(plugin.verl_policy_loss).parameters)
    theirs = list(inspect.signature(verl_core.get_policy_loss_fn("vanilla")).parameters)
    assert ours == theirs


@pytest.mark.parametrize("agg,info", [
    ("token-mean", {}),
    ("token-mean", {"dp_size": 2, "batch_num_tokens": 50}),
    ("seq-mean-token-mean", {"dp_size": 2, "global_batch_size": 7}),
    ("seq-mean-token-sum-norm", {"dp_size": 1, "global_batch_size": 4, "loss_scale_factor": 40}),
])
def test_matches_verl_vanilla_when_influence_is_pinned_to_one(agg, info, monkeypatch):
    """With f == 1 (clip range [1, 1]) and no invalidated rows, FIPO is DAPO: verl's own vanilla loss,
    including verl's global-batch aggregation across data-parallel ranks."""
    monkeypatch.delenv(plugin.ENV, raising=False)
    old, logp, adv, mask = _tensors(seed=1, spikes=False)
    cfg = _actor_config(future_kl_clip_ratio=1e-12, future_kl_clip_high_only=True)
    cfg.global_batch_info = info
    x1, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours, m = verl_core.get_policy_loss_fn("future_kl")(old, x1, adv, mask, agg, cfg)
    theirs, tm = verl_core.get_policy_loss_fn("vanilla")(old, x2, adv, mask, agg, cfg)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert m[key] == pytest.approx(tm[key], rel=1e-5, abs=1e-7)


def test_launcher_overrides_from_a_fipo_lite_config():
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["algorithm.tau=64", "algorithm.fkl_clip_low=0.8"])
    stock = plugin.launcher_overrides(cfg)
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=future_kl" in stock
    assert "actor_rollout_ref.actor.clip_ratio_high=0.28" in stock and "actor_rollout_ref.rollout.n=8" in stock
    env = [o for o in stock if plugin.ENV in o][0]
    knobs = json.loads(env.split("=", 1)[1].strip("'"))
    assert knobs["decay_rate"] == 64.0 and knobs["future_kl_clip_ratio"] == pytest.approx(0.2)
    assert knobs["future_kl_clip_high_only"] is False
    fork = plugin.launcher_overrides(cfg, target="fork")
    assert "+actor_rollout_ref.actor.policy_loss.decay_rate=64.0" in fork and not any(plugin.ENV in o for o in fork)
    with pytest.raises(ValueError, match="loss_mode is 'dapo'"):
        plugin.launcher_overrides(load_config(ROOT / "configs" / "tiny_cpu.yaml", ["algorithm.loss_mode=dapo"]))
    with pytest.raises(ValueError, match="no upstream equivalent"):
        plugin.launcher_overrides(load_config(ROOT / "configs" / "tiny_cpu.yaml", ["algorithm.fkl_clip_low=0.9"]))
    assert plugin.main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml")]) == 0


FIXTURE = ROOT / "tests" / "fixtures" / "fipo_recipe_32b_args.txt"


def _read_fixture() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in FIXTURE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(pairs)


def _printed_command(capsys, monkeypatch, target: str) -> tuple[str, dict[str, str]]:
    """The recipe's settings in a fipo_lite config -> `python -m fipo_lite.integrations.verl` -> (module, key -> value)."""
    overrides = ["trainer.train_batch_size=512", "trainer.ppo_mini_batch_size=64", "trainer.lr=1e-6", "trainer.eval_k=1",
                 "trainer.eval_every=5", "trainer.save_every=5", "algorithm.filter_groups.max_num_gen_batches=10"]
    cfg = load_config(ROOT / "configs" / "qwen2.5-32b.yaml", overrides)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # untyped, so that the next key may be new
    cfg.trainer.gen_batch_size = 2048  # the recipe's 4 x 512 (a config field in later fipo_lite versions)
    monkeypatch.setattr("fipo_lite.config.load_config", lambda *a, **k: cfg)
    assert plugin.main(["--config", "unused.yaml", "--target", target]) == 0
    words = shlex.split(capsys.readouterr().out.replace("\\\n", " "))
    assert words[:2] == ["python3", "-m"]
    return words[2], dict(w.split("=", 1) for w in words[3:])


def _same(printed: str, expected: str) -> bool:
    if printed.lower() in ("true", "false"):
        return printed.lower() == expected.lower()
    try:
        return float(printed) == float(expected)
    except ValueError:
        return printed == expected


def test_fork_command_is_the_upstream_run_script(capsys, monkeypatch):
    """Every recipe setting the script passes appears, with the script's key and value, in our command."""
    expected = _read_fixture()
    module, printed = _printed_command(capsys, monkeypatch, "fork")
    assert module == expected.pop("_entry") == plugin.ENTRY["fork"]
    wrong = {k: (printed.get(k), v) for k, v in expected.items() if k not in printed or not _same(printed[k], v)}
    assert not wrong, f"(ours, upstream) differ: {wrong}"


def test_stock_command_carries_the_same_settings(capsys, monkeypatch):
    """Stock verl 0.9.1: the same values under its own keys (STOCK_KEYS), FIPO knobs in the environment JSON."""
    expected = _read_fixture()
    expected.pop("_entry")
    module, printed = _printed_command(capsys, monkeypatch, "stock")
    assert module == "verl.trainer.main_ppo"
    knobs = json.loads(printed[f"+ray_kwargs.ray_init.runtime_env.env_vars.{plugin.ENV}"].strip("'"))  # in Hydra's quotes
    for key, value in expected.items():
        if key.startswith("+actor_rollout_ref.actor.policy_loss."):
            assert _same(str(knobs[key.rsplit(".", 1)[1]]), value), key
        else:
            assert _same(printed[plugin.STOCK_KEYS.get(key, key)], value), key
    assert printed["+reward.reward_kwargs.max_resp_len"] == "20480"


def test_printed_command_parses_with_hydras_own_override_parser(capsys, monkeypatch):
    """What the shell hands verl's main_ppo after the printed command is pasted: Hydra 1.3's parser must
    read every word, and the knobs variable must arrive as the JSON text (a bare {"k": v} is a parse error)."""
    pytest.importorskip("hydra", reason="hydra-core (verl's config system) is not installed")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = load_config(ROOT / "configs" / "qwen2.5-32b.yaml")
    monkeypatch.setattr("fipo_lite.config.load_config", lambda *a, **k: cfg)
    assert plugin.main(["--config", "unused.yaml", "--target", "stock"]) == 0
    words = shlex.split(capsys.readouterr().out.replace("\\\n", " "))[3:]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words)}
    env = parsed[f"ray_kwargs.ray_init.runtime_env.env_vars.{plugin.ENV}"]
    assert isinstance(env, str) and json.loads(env) == plugin.recipe_knobs(cfg)
    assert parsed["actor_rollout_ref.actor.policy_loss.loss_mode"] == "future_kl"


def test_an_influence_clip_of_one_is_refused_not_printed_as_no_clip():
    with pytest.raises(ValueError, match="no clipping at all"):
        plugin.recipe_knobs(load_config(ROOT / "configs" / "tiny_cpu.yaml", ["algorithm.fkl_clip_low=1.0", "algorithm.fkl_clip_high=1.0"]))


def test_an_lr_schedule_verl_would_not_run_is_refused():
    with pytest.raises(ValueError, match="trainer.lr_scheduler=cosine has no translation"):
        plugin.launcher_overrides(load_config(ROOT / "configs" / "tiny_cpu.yaml", ["trainer.lr_scheduler=cosine"]))
    assert plugin.main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "trainer.lr_scheduler=cosine"]) == 2
    with pytest.raises(ValueError, match="reward.function / reward.functions have no translation"):  # verl would score with DAPO's
        plugin.launcher_overrides(load_config(ROOT / "configs" / "tiny_cpu.yaml", ["reward.functions=[{function: exact}]"]))


def test_trackers_names_overlong_prompts_and_validation_sets_reach_verl(capsys, monkeypatch):
    """trainer.logger / project / run_name, data.filter_overlong_prompts and a list of validation sets are
    translated (and parse with Hydra's parser); data verl cannot read is named on stderr, not dropped silently."""
    a, b = str(ROOT / "x" / "aime.parquet"), str(ROOT / "x" / "math.parquet")
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        "trainer.logger=[console,wandb]", "trainer.project=proj", "trainer.run_name=try1", "data.filter_overlong_prompts=true",
        f"data.val=[{a},{b},synthetic:modsum]"])
    printed = dict(o.split("=", 1) for o in plugin.launcher_overrides(cfg))
    assert printed["trainer.logger"] == "[console,wandb]" and printed["trainer.project_name"] == "proj"
    assert printed["trainer.experiment_name"] == "try1" and printed["data.filter_overlong_prompts"] == "True"
    assert printed["data.val_files"] == f"[{a},{b}]" and "data.train_files" not in printed
    notes = plugin.untranslated(cfg)
    assert len(notes) == 2 and "data.train='synthetic:" in notes[0] and "data.val='synthetic:modsum'" in notes[1]
    default = dict(o.split("=", 1) for o in plugin.launcher_overrides(load_config(ROOT / "configs" / "tiny_cpu.yaml")))
    assert default["trainer.logger"] == "[console]" and default["trainer.experiment_name"] == Path(cfg.output_dir).name

    monkeypatch.setattr("fipo_lite.config.load_config", lambda *a, **k: cfg)
    assert plugin.main(["--config", "unused.yaml"]) == 0
    out, err = capsys.readouterr()
    assert err.count("[fipo_lite] note: data.") == 2
    pytest.importorskip("hydra", reason="hydra-core (verl's config system) is not installed")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = shlex.split(out.replace("\\\n", " "))[3:]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words)}
    assert parsed["trainer.logger"] == ["console", "wandb"] and parsed["data.val_files"] == [a, b]
