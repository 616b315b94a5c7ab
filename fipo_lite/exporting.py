"""The `export` command: a trained run as a plain Hugging Face model that transformers and vLLM load.

    python -m fipo_lite export RUN_OR_CHECKPOINT --out DIR [--dtype bfloat16] [--push-to-hub ORG/NAME]

A run directory stands for its newest checkpoint that verifies (the one `evaluate RUN` reads); a
checkpoint is verified against its manifest before anything is read. The base model is the one the
run trained on, resolved from the checkpoint's config as the trainer resolves it (the tiny model, a
converted GGUF, a directory or hub name). A LoRA run's adapter is merged into that base (peft's
`merge_and_unload`); a full fine-tune's weights are loaded as they are. A run trained on a 4-bit base
(model.backend bnb4 or unsloth) is merged into the base's own 16-bit weights (float32 without a GPU),
as Unsloth's merged save does: the exported model differs from the NF4 policy the run sampled by the
quantization error of the base, not of the adapter.

The directory holds safetensors weights, config, tokenizer (chat template included), a generation
config whose EOS ids are the tokenizer's and the base's (what the trainer's sampler stopped at), and
`fipo_lite_export.json` (source checkpoint, step, base, dtype). It is written under a temporary name
and renamed into place, so a killed export leaves nothing half-written.

In a notebook: `fipo_lite.export(run, "out/dir")` (`fipo_lite.api.export`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import checkpoint
from .checks import check_model_path, require_extra, resolve_model_path
from .errors import UserError

QUANTIZED_BACKENDS = ("bnb4", "unsloth")  # 4-bit bases: exported from their 16-bit weights
INFO_FILE = "fipo_lite_export.json"
RUN_CONFIG = "config.yaml"  # rundir.CONFIG_FILE: the run's starting config, for checkpoints saved without one


def checkpoint_of(source: str | Path) -> Path:
    """The verified checkpoint a run directory or checkpoint path names; a CheckpointError otherwise."""
    p = Path(source)
    if (p / "checkpoints").is_dir():
        return checkpoint.of_run(p)
    if not p.is_dir():
        raise UserError(f"{p} does not exist: give a run directory (output_dir) or one of its checkpoints/step_N")
    if not ((p / checkpoint.MANIFEST_FILE).is_file() or (p / checkpoint.STATE_FILE).is_file()):
        raise UserError(f"{p} is neither a run directory (no checkpoints/) nor a checkpoint (no {checkpoint.MANIFEST_FILE})")
    checkpoint.verify(p)
    return p


def run_config(ckpt: Path, required: bool = True) -> dict:
    """The config the checkpoint was trained with (saved with it, or the run's config.yaml for older ones)."""
    raw = checkpoint.read_config(ckpt)
    legacy = ckpt.parent.parent / RUN_CONFIG
    if raw is None and legacy.is_file():
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(OmegaConf.load(legacy))
    if raw is None and required:
        raise UserError(f"checkpoint {ckpt} has no {checkpoint.CONFIG_FILE} and its run has no {RUN_CONFIG}: "
                        "cannot tell which base model it was trained on (give --base)")
    return raw if isinstance(raw, dict) else {}


def model_config(raw: dict):
    """The run's model section as a typed ModelConfig (defaults for keys it lacks)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import ModelConfig

    try:
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.get("model") or {})
    except OmegaConfBaseException as e:
        raise UserError(f"the run's model section cannot be read by this fipo_lite: {str(e).splitlines()[0]}") from None


def default_dtype(model_cfg) -> str:
    """The run's model.dtype; for a 4-bit base its 16-bit weights on a GPU machine, float32 without one."""
    if model_cfg.backend in QUANTIZED_BACKENDS:
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"
    return model_cfg.dtype


def untie_adapted_embeddings(peft_model) -> bool:
    """Give the output embedding its own weight when it is tied to the input embedding and an adapter
    sits on either: merging W + BA into a shared tensor would change the other module too (the token
    embeddings would get the head's update). The config then says untied, so loaders keep both."""
    import torch

    base = peft_model.get_base_model()
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if inp is None or out is None:
        return False
    plain_in, plain_out = getattr(inp, "base_layer", inp), getattr(out, "base_layer", out)
    if plain_in.weight.data_ptr() != plain_out.weight.data_ptr():
        return False
    if not (hasattr(inp, "base_layer") or hasattr(out, "base_layer")):
        return False  # no adapter on either: they stay tied
    plain_out.weight = torch.nn.Parameter(plain_out.weight.detach().clone(), requires_grad=False)
    for c in {id(base.config): base.config, id(base.config.get_text_config()): base.config.get_text_config()}.values():
        c.tie_word_embeddings = False
    return True


def eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS first, then the base generation config's: the ids the trainer's sampler stops at."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = getattr(model.generation_config, "eos_token_id", None)
    for i in [gen] if isinstance(gen, int) else list(gen or []):
        if i not in ids:
            ids.append(int(i))
    if not ids:
        raise UserError("the base model's tokenizer and generation config name no EOS token: generation could never stop")
    return ids


def load_base(base: str, dtype: str, trust_remote_code: bool):
    """The base model in `dtype` on the CPU, refusing a base stored quantized (no 16-bit weights to merge into)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .backends.hf import DTYPES

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise UserError(f"base model {base} is stored quantized ({method}): exporting needs its 16-bit weights; "
                        "give the unquantized model with --base")
    return AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)


def export_model(source: str | Path, out: str | Path, *, dtype: str | None = None, base: str | None = None,
                 push_to_hub: str | None = None, private: bool = False, log=None) -> Path:
    """Write the merged model of `source` (a run directory or checkpoint) to `out`; returns `out`."""
    from transformers import AutoTokenizer

    from .backends.hf import DTYPES

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: remove it or choose another directory")
    if push_to_hub:
        require_extra("huggingface_hub", "hub", "--push-to-hub")  # before minutes of merging
    ckpt = checkpoint_of(source)
    raw = run_config(ckpt, required=base is None)
    mcfg = model_config(raw)
    dtype = dtype or default_dtype(mcfg)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: must be one of {list(DTYPES)}")
    adapter = ckpt / "adapter"
    lora = (adapter / "adapter_config.json").is_file()
    if base is None:
        base = resolve_model_path(mcfg)
        check_model_path(base, "the run's model.path")
    else:
        check_model_path(base, "--base")
    trust = bool(mcfg.trust_remote_code)
    log(f"[fipo_lite] export: {ckpt} ({'LoRA adapter merged into' if lora else 'full weights over'} {base}, {dtype})")
    model = load_base(base, dtype, trust)
    if lora:
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter))
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names of another base
            raise checkpoint.CheckpointError(f"checkpoint {ckpt}: its adapter does not fit base {base}: "
                                             f"{str(e).strip().splitlines()[0][:300]}") from None
        untied = untie_adapted_embeddings(peft_model)
        model = peft_model.merge_and_unload()
        if untied:
            log("[fipo_lite] export: the adapter covers the tied embeddings, so the exported lm_head has its own weight")
    else:
        checkpoint.load_adapter(ckpt, model)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = eos_ids(model, tokenizer)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {"source": str(ckpt.resolve()), "step": int(ckpt.name.rsplit("_", 1)[-1]) if ckpt.name.startswith("step_") else None,
            "base": base, "dtype": dtype, "merged_lora": lora, "backend": mcfg.backend}
    with checkpoint.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    log(f"[fipo_lite] export: wrote {out}")
    if push_to_hub:
        upload(out, push_to_hub, private, f"fipo_lite export of {ckpt.name}")
        log(f"[fipo_lite] export: uploaded to https://huggingface.co/{push_to_hub}")
    return out


def upload(folder: Path, repo: str, private: bool, message: str) -> None:
    """Create the hub repo (if needed) and upload the folder, with huggingface_hub (the `hub` extra)."""
    require_extra("huggingface_hub", "hub", "--push-to-hub")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message)
    except Exception as e:  # noqa: BLE001 - no login, no network, no write access: the user fixes each
        raise UserError(f"--push-to-hub {repo}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''} "
                        f"(the export itself is in {folder})") from None


def main(argv: list[str] | None = None) -> int:
    from .backends.hf import DTYPES

    ap = argparse.ArgumentParser(prog="fipo_lite export", description=__doc__.split("\n")[0])
    ap.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest good checkpoint) or a checkpoint dir")
    ap.add_argument("--out", required=True, help="directory to write (must not exist, or be empty)")
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                    help="weights' dtype (default: the run's model.dtype; a 4-bit run: bfloat16 with a GPU, float32 without)")
    ap.add_argument("--base", default=None, help="the base model to merge into (default: the run's model.path, resolved as in training)")
    ap.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="also upload the directory (needs the hub extra and a login)")
    ap.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = ap.parse_args(argv)
    try:
        out = export_model(args.source, args.out, dtype=args.dtype, base=args.base, push_to_hub=args.push_to_hub, private=args.private)
    except (ValueError, ImportError, OSError) as e:  # UserError / CheckpointError, no such base, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
