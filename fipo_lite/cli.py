"""`python -m fipo_lite COMMAND ...` / `fipo-lite COMMAND ...`.

Each command lives in its own module and exposes `main(argv)`; this file only dispatches, so a
command's heavy imports (torch, matplotlib, vllm) load only when that command runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("fipo_lite.trainer", "train an adapter: train --config FILE [key=value ...]"),
    "evaluate": ("fipo_lite.evaluation", "avg@k / pass@k / cons@k of a model or checkpoint on a data file"),
    "export": ("fipo_lite.exporting", "merge a run's adapter into its base, write a HF model dir: export RUN --out DIR"),
    "plot": ("fipo_lite.plots", "response-length dynamics of one or more runs: plot RUN_DIR [...] -o OUT.png"),
    "ablate": ("fipo_lite.ablation", "run a grid of overrides over seeds: ablate configs/ablations/NAME.yaml"),
    "plan": ("fipo_lite.planner", "predict peak GPU memory: plan --config FILE --gpu-gb N"),
    "build-tiny": ("fipo_lite.tiny_cli", "build (or reuse) the tiny CPU model and print its path"),
}


def usage() -> str:
    lines = ["usage: python -m fipo_lite COMMAND [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
