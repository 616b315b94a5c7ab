"""`python -m fipo_lite build-tiny`: build (or reuse) the tiny CPU model, print its path and per-form accuracy.

The command lives apart from `tiny.py` because it reads a run config and loads through `evaluation`,
both of which (through the backends) import `tiny`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import load_config
from .errors import UserError
from .evaluation import load_for_eval
from .tiny import build_tiny, measure_forms, ship_tiny


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fipo_lite build-tiny", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="run config whose model section to use (default: built-in defaults)")
    ap.add_argument("--no-measure", action="store_true", help="skip sampling the val problems after building")
    ap.add_argument("--rebuild", action="store_true",
                    help="build here (or reuse this machine's cached build) even where the shipped model applies")
    ap.add_argument("--ship", action="store_true",
                    help="build here and replace the model shipped in the package (fipo_lite/assets/tiny) with it")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.tiny.warm_start_steps=300")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = build_tiny(cfg.model, rebuild=args.rebuild or args.ship)
    if args.ship:
        words = ["python -m fipo_lite build-tiny --ship", *(["--config", args.config] if args.config else []), *args.overrides]
        path = ship_tiny(path, command=" ".join(words))
    print(path)
    if not args.no_measure:
        model, tok = load_for_eval(str(path), device="cpu")
        stats = measure_forms(model, tok, cfg.model.tiny.task, n=cfg.data.val_size or 256, seed=cfg.seed,
                              max_new_tokens=cfg.rollout.max_new_tokens)
        print(json.dumps(stats, indent=1))
    return 0
