"""Run directories: one writer, one experiment, data-only and verified checkpoints (issue 13)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fipo_lite import checkpoint, metrics as M, rundir
from fipo_lite.trainer import main

ROOT = Path(__file__).resolve().parents[1]


def _args(model_dir: Path, out: Path, **extra) -> list[str]:
    """A seconds-long run on the random tiny model: no filtering, no eval, a checkpoint every step."""
    base = {
        "model.path": str(model_dir), "output_dir": str(out), "trainer.total_steps": 2, "trainer.train_batch_size": 2,
        "trainer.ppo_mini_batch_size": 1, "trainer.micro_batch_size": 8, "rollout.n": 2, "rollout.max_new_tokens": 8,
        "trainer.eval_every": 0, "trainer.save_every": 1, "trainer.keep_checkpoints": 3, "trainer.progress": False,
        "algorithm.filter_groups.enable": False, "data.train": "synthetic:addition", "data.train_size": 64,
        "data.val": "synthetic:addition",
    }
    base.update(extra)
    return ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), *[f"{k}={v}" for k, v in base.items()]]


def _steps(out: Path) -> list[int]:
    return [r[M.STEP] for r in M.read_jsonl(out / "metrics.jsonl")]


def _err_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (copied by tests that change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(tiny_model_dir, out)) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 1. one writer
def test_a_held_directory_stops_a_second_train_at_once(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with rundir.hold(out):
        t0 = time.perf_counter()
        assert main(_args(tiny_model_dir, out)) == 2
        assert time.perf_counter() - t0 < 5  # before the model loads
    err = _err_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(out) in err[0] and f"pid {os.getpid()}" in err[0], err
    assert not (out / "metrics.jsonl").exists()
    with rundir.hold(out):  # released when the holder's block ends
        pass
    assert (out / rundir.LOCK_FILE).read_text() == ""  # a clean exit leaves no holder record


def test_two_processes_racing_for_one_directory(tiny_model_dir, tmp_path):
    out, go = tmp_path / "race", tmp_path / "go"
    # both import first, then start `train` together when `go` appears: a race, not a queue
    script = textwrap.dedent(f"""
        import os, sys, time
        from fipo_lite.trainer import main
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        sys.exit(main(sys.argv[1:]))
    """)
    cmd = [sys.executable, "-c", script, *_args(tiny_model_dir, out, **{"trainer.total_steps": 3})]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1)
    go.touch()
    errs = [p.communicate(timeout=300)[1] for p in procs]
    results = [(p.pid, p.returncode, e) for p, e in zip(procs, errs)]
    codes = sorted(rc for _, rc, _ in results)
    assert codes == [0, 2], results
    (win_pid, _, _), = [r for r in results if r[1] == 0]
    (_, _, lose_err), = [r for r in results if r[1] == 2]
    err = _err_lines(lose_err)
    assert len(err) == 1 and str(out) in err[0] and f"pid {win_pid}" in err[0], lose_err
    assert _steps(out) == [1, 2, 3]  # one writer: no interleaved or repeated steps
    assert [p.name for p in checkpoint.candidates(out / "checkpoints")] == ["step_000003", "step_000002", "step_000001"]


def test_forked_children_do_not_keep_the_lock(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    started = ctx.Event()

    def worker():  # like a reward worker: lives on, doing something else
        started.set()
        time.sleep(30)

    out = tmp_path / "fork"
    with rundir.hold(out):
        child = ctx.Process(target=worker, daemon=True)
        child.start()
        assert started.wait(30)
    try:
        with rundir.hold(out):  # would fail if the child's inherited fd kept the lock alive
            pass
    finally:
        child.kill()
        child.join()


# ----------------------------------------------------------------------------- 2. one experiment
def test_resume_with_a_training_relevant_change_is_refused(tiny_model_dir, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    before = ((out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text())
    assert main(_args(tiny_model_dir, out, **{"lora.r": 8, "algorithm.loss_mode": "dapo", "trainer.lr": 0.01,
                                            "trainer.total_steps": 5})) == 2
    err = _err_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    for part in (str(out), "lora.r 16 -> 8", 'algorithm.loss_mode "fipo" -> "dapo"', "trainer.lr 0.0003 -> 0.01",
                 "another output_dir", "trainer.resume=never", "trainer.allow_config_change=true"):
        assert part in err[0], (part, err[0])
    assert "total_steps" not in err[0]  # an allowed change is not blamed
    assert ((out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()) == before
    assert not (out / rundir.HISTORY_FILE).exists()


def test_allowed_and_opted_in_changes_are_recorded(tiny_model_dir, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    original = (out / "config.yaml").read_text()
    # total steps and threads may change: the run continues and the change is recorded at step 2
    assert main(_args(tiny_model_dir, out, **{"trainer.total_steps": 3, "trainer.num_threads": 1})) == 0
    assert _steps(out) == [1, 2, 3]
    hist = [json.loads(x) for x in (out / rundir.HISTORY_FILE).read_text().splitlines()]
    assert len(hist) == 1 and hist[0]["step"] == 2 and hist[0]["allowed_by"] is None
    assert hist[0]["changes"] == {"trainer.total_steps": [2, 3], "trainer.num_threads": [0, 1],
                                  "output_dir": [str(finished), str(out)]}  # the copy moved it
    # a changed learning rate needs the opt-in; then it is recorded with the step it took effect
    lr = ["trainer.total_steps=4", "trainer.num_threads=1", "trainer.lr=0.001"]
    args = _args(tiny_model_dir, out, **dict(a.split("=") for a in lr))
    assert main(args) == 2
    assert main([*args, "trainer.allow_config_change=true"]) == 0
    assert "continues from step 3 with a changed config: trainer.lr 0.0003 -> 0.001" in capsys.readouterr().err
    hist = [json.loads(x) for x in (out / rundir.HISTORY_FILE).read_text().splitlines()]
    assert len(hist) == 2 and hist[1]["step"] == 3 and hist[1]["allowed_by"] == "trainer.allow_config_change"
    assert hist[1]["changes"]["trainer.lr"] == [0.0003, 0.001]
    assert _steps(out) == [1, 2, 3, 4]
    rows = M.read_jsonl(out / "metrics.jsonl")
    assert rows[2]["actor/lr"] == pytest.approx(0.0003) and rows[3]["actor/lr"] == pytest.approx(0.001)  # applied, not only recorded
    # the newest checkpoint was trained with the new lr: resuming with it needs no opt-in any more
    assert main(_args(tiny_model_dir, out, **dict(a.split("=") for a in lr))) == 0
    assert (out / "config.yaml").read_text() == original  # the run's start is never rewritten


def test_opted_in_shape_change_is_one_line(tiny_model_dir, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    assert main(_args(tiny_model_dir, out, **{"lora.r": 8, "trainer.allow_config_change": "true", "trainer.total_steps": 3})) == 2
    err = _err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "does not fit the model" in err[0] and "size mismatch" in err[0], err


def test_resume_never_starts_over_without_mixing(tiny_model_dir, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    assert main(_args(tiny_model_dir, out, **{"trainer.resume": "never", "trainer.total_steps": 1, "lora.r": 8})) == 0
    assert _steps(out) == [1]
    assert [p.name for p in checkpoint.candidates(out / "checkpoints")] == ["step_000001"]
    assert "r: 8" in (out / "config.yaml").read_text()


# ----------------------------------------------------------------------------- 3. data, never code
class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_000002"
    marker = tmp_path / "payload_ran"
    state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=True)
    state["scheduler"] = Payload(marker)
    torch.save(state, ckpt / checkpoint.STATE_FILE)
    (ckpt / checkpoint.MANIFEST_FILE).unlink()
    checkpoint._write_manifest(ckpt, 2)  # an attacker rewrites the manifest too
    # the payload is real: an unsafe load runs it
    torch.load(ckpt / checkpoint.STATE_FILE, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(checkpoint.CheckpointError, match="refused"):
        checkpoint.read_state(ckpt)
    assert main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), f"output_dir={tmp_path / 'other'}",
                 f"trainer.resume={ckpt}"]) == 2
    err = _err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "refused" in err[0] and str(ckpt) in err[0] and "posix.system" in err[0], err
    assert not marker.exists()


def test_state_is_saved_as_plain_data(tmp_path):
    # the structure of bitsandbytes' 8-bit optimizer state: ints, tuples, None, tensors (paged ones carry attributes)
    paged = torch.zeros(4, dtype=torch.uint8)
    paged.is_paged = True
    bnb_like = {"state": {0: {"step": 3, "state1": paged, "qmap1": torch.linspace(-1, 1, 8), "absmax1": torch.ones(1)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "optim_bits": 8,
                                  "percentile_clipping": 100, "block_wise": True, "max_unorm": 0.0, "alpha": None,
                                  "params": [0]}]}
    p = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    adam.step()
    state = {"step": 1, "bnb": bnb_like, "adamw": adam.state_dict(), "rng": checkpoint.rng_state(), "data": {"epoch": 0, "pos": 2}}
    torch.save(checkpoint.plain(state), tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert back["bnb"]["param_groups"] == bnb_like["param_groups"] and back["bnb"]["state"][0]["step"] == 3
    assert torch.equal(back["bnb"]["state"][0]["state1"], paged) and torch.equal(back["adamw"]["state"][0]["exp_avg"], adam.state_dict()["state"][0]["exp_avg"])
    adam2 = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    adam2.load_state_dict(back["adamw"])
    import random

    checkpoint.set_rng_state(back["rng"])
    a = (random.random(), torch.rand(2))
    checkpoint.set_rng_state(back["rng"])
    assert a[0] == random.random() and torch.equal(a[1], torch.rand(2))
    with pytest.raises(TypeError, match=r"state\.bad is a PosixPath"):
        checkpoint.plain({"bad": tmp_path})


def test_checkpoint_of_the_old_format_still_loads_as_data(finished, tmp_path):
    import random

    ckpt = _copy(finished / "checkpoints" / "step_000002", tmp_path / "step_000002")
    (ckpt / checkpoint.MANIFEST_FILE).unlink()
    (ckpt / checkpoint.CONFIG_FILE).unlink()
    state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=True)
    state["rng"]["python"] = random.getstate()  # the old format kept python's tuple as is
    torch.save(state, ckpt / checkpoint.STATE_FILE)
    back = checkpoint.read_state(ckpt)
    assert back["step"] == 2 and checkpoint.read_config(ckpt) is None
    checkpoint.set_rng_state(back["rng"])
    assert random.getstate() == state["rng"]["python"]


# ----------------------------------------------------------------------------- 4. damaged checkpoints
def test_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(tiny_model_dir, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    adapter = out / "checkpoints" / "step_000002" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # a partial copy / a full disk
    found = checkpoint.pick(out / "checkpoints")
    assert found[0].name == "step_000001" and found[1]["step"] == 1
    err = capsys.readouterr().err
    assert "step_000002" in err and "adapter/adapter_model.safetensors has 100 bytes" in err and "resuming from step_000001" in err
    # train resumes from there, redoes step 2 and writes a good step 2
    assert main(_args(tiny_model_dir, out)) == 0
    err = capsys.readouterr().err
    assert "resuming from step_000001" in err and "step_000001 at step 1" in err
    assert _steps(out) == [1, 2]
    checkpoint.verify(out / "checkpoints" / "step_000002")
    # a flipped byte (same size) is caught by the checksum; with every checkpoint damaged, one line says so
    for ckpt in checkpoint.candidates(out / "checkpoints"):
        data = bytearray((ckpt / checkpoint.STATE_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / checkpoint.STATE_FILE).write_bytes(bytes(data))
    assert main(_args(tiny_model_dir, out)) == 2
    err = _err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "no usable checkpoint" in err[0] and "trainer.resume=never" in err[0] and str(out) in err[0], err
    assert "does not match its checksum" in err[0]


def test_kill_9_while_a_checkpoint_is_written(tiny_model_dir, tmp_path, capsys):
    """A run SIGKILLed inside save (step 2's files half written) resumes from step 1, takes over its lock
    and ends with one row per step."""
    out, mark = tmp_path / "run", tmp_path / "in_save"
    script = textwrap.dedent(f"""
        import os, sys, time
        from fipo_lite import checkpoint, trainer
        real = checkpoint._write_manifest
        def paused(folder, step):
            if step == 2:
                open({str(mark)!r}, "w").write(str(os.getpid()))
                time.sleep(300)
            real(folder, step)
        checkpoint._write_manifest = paused
        sys.exit(trainer.main(sys.argv[1:]))
    """)
    args = _args(tiny_model_dir, out, **{"trainer.total_steps": 3})
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", script, *args], env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not mark.exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / ".step_000002.tmp" / checkpoint.STATE_FILE).exists()  # killed mid-save
    assert _steps(out) == [1, 2]  # step 2 was logged, its checkpoint never finished
    assert json.loads((out / rundir.LOCK_FILE).read_text())["pid"] == proc.pid  # a stale record

    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock left by a run that is no longer running (pid {proc.pid}" in err
    assert "resumed from" in err and "step_000001 at step 1" in err
    assert _steps(out) == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002", "step_000003"]


def test_manifest_entries_stay_inside_and_cover_every_file(finished, tmp_path):
    """A manifest cannot vouch for a file outside its checkpoint, and a file it does not list (e.g. the
    adapter after its entry was removed) is not trusted; a malformed manifest is one CheckpointError."""
    out = _copy(finished, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_000002"
    mf = ckpt / checkpoint.MANIFEST_FILE
    good = json.loads(mf.read_text())
    checkpoint.verify(ckpt)

    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the checkpoint")
    m = json.loads(json.dumps(good))
    m["files"][os.path.relpath(outside, ckpt)] = {"size": outside.stat().st_size, "sha256": checkpoint.file_sha256(outside)}
    mf.write_text(json.dumps(m))
    with pytest.raises(checkpoint.CheckpointError, match="outside the checkpoint"):
        checkpoint.verify(ckpt)

    m = json.loads(json.dumps(good))
    adapter = next(k for k in m["files"] if k.endswith("adapter_model.safetensors"))
    del m["files"][adapter]
    mf.write_text(json.dumps(m))
    with pytest.raises(checkpoint.CheckpointError, match="not in its manifest"):
        checkpoint.verify(ckpt)

    for files in ([], {checkpoint.STATE_FILE: {"sha256": "x"}}):
        mf.write_text(json.dumps({**good, "files": files}))
        with pytest.raises(checkpoint.CheckpointError, match="malformed"):
            checkpoint.verify(ckpt)
    mf.write_text(json.dumps(good))
    checkpoint.verify(ckpt)


def test_a_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 0.')  # killed while appending step 3
    with pytest.warns(UserWarning, match="cut short"):
        assert M.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # damage inside the file is an error
    with pytest.raises(ValueError, match="line 2"):
        M.read_jsonl(path)


def test_old_format_checkpoint_with_a_truncated_adapter_is_one_error(tiny_model_dir, finished, tmp_path):
    """No manifest to catch it (written before manifests): the loader names the damage, no SafetensorError traceback."""
    out = _copy(finished, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_000002"
    (ckpt / checkpoint.MANIFEST_FILE).unlink()
    adapter = ckpt / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    from fipo_lite.config import load_config
    from fipo_lite.backends import load_model

    model, _ = load_model(load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu"]))
    with pytest.raises(checkpoint.CheckpointError, match="cannot read its adapter weights"):
        checkpoint.load_adapter(ckpt, model)


def test_a_rollback_is_not_undone_by_a_later_auto_resume(tiny_model_dir, tmp_path, capsys):
    """resume=PATH to step 2 of a 4-step run, train to 3, then resume=auto: the run continues the new
    branch (not the abandoned step 4), pruning keeps the new branch, and the old steps are kept aside."""
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, out, **{"trainer.total_steps": 4, "trainer.keep_checkpoints": 2})) == 0
    ckpts = out / "checkpoints"
    lr_of = lambda c: checkpoint.read_config(c)["trainer"]["lr"]  # noqa: E731 - which branch a checkpoint is on
    assert lr_of(ckpts / "step_000004") == 3e-4
    # keep_checkpoints=2 pruned step 2: roll back to step 3 instead, then train two new steps (4, 5)
    assert main(_args(tiny_model_dir, out, **{"trainer.total_steps": 4, "trainer.keep_checkpoints": 2,
                                              "trainer.resume": ckpts / "step_000003", "trainer.lr": 1e-2,
                                              "trainer.allow_config_change": "true"})) == 0
    assert "belong to the branch this resume leaves" in capsys.readouterr().err
    assert lr_of(ckpts / "step_000004") == 1e-2  # step 4 of the new branch, not the abandoned one
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    aside = list((ckpts / checkpoint.ABANDONED_DIR).rglob("step_000004"))
    assert len(aside) == 1 and lr_of(aside[0]) == 3e-4  # the abandoned step is kept
    assert main(_args(tiny_model_dir, out, **{"trainer.total_steps": 5, "trainer.keep_checkpoints": 2, "trainer.lr": 1e-2})) == 0
    assert "resumed from" in capsys.readouterr().err
    assert _steps(out) == [1, 2, 3, 4, 5]
    assert checkpoint.find_latest(ckpts).name == "step_000005"
    assert sorted(p.name for p in checkpoint.candidates(ckpts)) == ["step_000004", "step_000005"]
    assert lr_of(ckpts / "step_000004") == 1e-2


def test_lr_schedules_follow_transformers_and_survive_a_resume(tiny_model_dir, tmp_path):
    """trainer.lr_scheduler=cosine is transformers' schedule over trainer.total_steps, and a run killed
    after step 2 and resumed logs the same lr per step as one that ran through."""
    from transformers import get_scheduler

    from fipo_lite.config import load_config
    from fipo_lite.trainer import make_scheduler

    cfg = load_config(None, ["trainer.lr_scheduler=cosine", "trainer.total_steps=6", "trainer.warmup_steps=2", "trainer.lr=0.5"])
    ours = make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5), cfg.trainer)
    ref = get_scheduler("cosine", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5), num_warmup_steps=2, num_training_steps=6)
    seq = []
    for _ in range(6):
        assert ours.get_last_lr() == pytest.approx(ref.get_last_lr())
        seq.append(ours.get_last_lr()[0])
        ours.step(), ref.step()
    assert seq[0] == 0 and max(seq) == pytest.approx(0.5) and seq[-1] < 0.1  # warmup from 0, then the cosine decay

    extra = {"trainer.lr_scheduler": "cosine", "trainer.total_steps": 4, "trainer.lr": 1e-2, "trainer.warmup_steps": 1}
    through, parts = tmp_path / "through", tmp_path / "parts"
    assert main(_args(tiny_model_dir, through, **extra)) == 0
    assert main(_args(tiny_model_dir, parts, **{**extra, "trainer.total_steps": 2})) == 0
    # the cosine was laid out over 2 steps: stretching it to 4 changes the lr to come, so it is opted into
    assert main(_args(tiny_model_dir, parts, **extra)) == 2
    assert main(_args(tiny_model_dir, parts, **extra, **{"trainer.allow_config_change": "true"})) == 0
    lrs = lambda out: [r["actor/lr"] for r in M.read_jsonl(out / "metrics.jsonl")]  # noqa: E731
    # actor/lr is the lr set for the next step: the first part logged its own 2-step plan at step 2; from
    # the resume on, the lr follows the 4-step plan exactly as in the run that went through
    assert lrs(parts)[2:] == pytest.approx(lrs(through)[2:]) and lrs(parts)[:1] == pytest.approx(lrs(through)[:1])
    assert len(set(lrs(through))) == 4  # a schedule, not a constant


def test_a_reward_or_data_file_edited_between_run_and_resume_is_caught(tiny_model_dir, tmp_path, capsys):
    """The config names a reward file and a data file by path: their content changing under the same
    config is a change of experiment, refused on resume like a config change unless opted in, and recorded."""
    reward = tmp_path / "my_reward.py"
    reward.write_text("def score(response, ground_truth):\n    return float(ground_truth in response)\n")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(10, 30)))
    out = tmp_path / "run"
    args = _args(tiny_model_dir, out, **{"reward.function": f"{reward}:score", "data.train": str(data)})
    assert main(args) == 0
    state = checkpoint.read_state(out / "checkpoints" / "step_000002")
    assert set(state["inputs"]) == {f"file {reward}", f"file {data}"}

    more = [*args, "trainer.total_steps=3"]
    reward.write_text("def score(response, ground_truth):\n    return 1.0\n")  # the same config, another reward
    assert main(more) == 2
    err = _err_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"file {reward}" in err[0] and "trainer.allow_config_change=true" in err[0], err
    assert f"file {data}" not in err[0] and _steps(out) == [1, 2]
    assert main([*more, "trainer.allow_config_change=true"]) == 0
    assert _steps(out) == [1, 2, 3]
    hist = [json.loads(x) for x in (out / rundir.HISTORY_FILE).read_text().splitlines()]
    changed = hist[-1]["changes"]
    assert f"file {reward}" in changed and f"file {data}" not in changed and hist[-1]["allowed_by"] == "trainer.allow_config_change"
    assert changed[f"file {reward}"][0] == state["inputs"][f"file {reward}"][:12] != changed[f"file {reward}"][1]

    with open(data, "a") as f:  # the data file grows
        f.write(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert main([*args, "trainer.total_steps=4"]) == 2
    assert f"file {data}" in _err_lines(capsys.readouterr().err)[0]
