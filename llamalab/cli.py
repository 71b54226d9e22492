"""``llamalab <stage> ...``: parse flags into the stage's config dataclass and call its ``main()``.

No logic lives here. A stage is a module with a ``Config`` dataclass and ``main(cfg)``; the table
below maps command words to modules, imported only when that command runs (so that optional
extras such as fastapi are needed only by the commands that use them).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback

from llamalab.common import LlamalabError

# command words -> module (a module exposes `Config` and `main(cfg)`)
COMMANDS: dict[str, str | dict[str, str]] = {
    "run": "llamalab.commands.run",
    "info": "llamalab.commands.info",
    "convert": "llamalab.commands.convert",
    "tokenizer": {"train": "llamalab.commands.tokenizer.train", "encode": "llamalab.commands.tokenizer.encode"},
    "pretrain": "llamalab.commands.pretrain",
    "data": {
        "clean": "llamalab.commands.data.clean",
        "mix": "llamalab.commands.data.mix",
        "stats": "llamalab.commands.data.stats",
        "shard": "llamalab.commands.data.shard",
        "which-step": "llamalab.commands.data.which_step",
    },
    "eval": {
        "run": "llamalab.commands.eval.run",
        "sweep": "llamalab.commands.eval.sweep",
        "memorization": "llamalab.commands.eval.memorization",
        "harness": "llamalab.commands.eval.harness",
    },
    "sft": "llamalab.commands.sft",
    "rm": {"": "llamalab.commands.rm", "score": "llamalab.commands.rm_score"},
    "rejection-sample": "llamalab.commands.rejection_sample",
    "dpo": "llamalab.commands.dpo",
    "ppo": "llamalab.commands.ppo",
    "generate": "llamalab.commands.generate",
    "chat": "llamalab.commands.chat",
    "serve": "llamalab.commands.serve",
    "report": "llamalab.commands.report",
    "release": {"": "llamalab.commands.release", "verify": "llamalab.commands.release_verify"},
    "gatt": {"": "llamalab.commands.gatt", "eval": "llamalab.commands.gatt_eval"},
    "judge": "llamalab.commands.judge",
    "selfinstruct": "llamalab.commands.selfinstruct",
    "recipe": {"chat": "llamalab.commands.recipe_chat"},
}


def _usage(table: dict, prefix: str) -> str:
    lines = [f"usage: {prefix} <command> [flags]   ({prefix} <command> --help for its flags)", "", "commands:"]
    for word, target in table.items():
        if isinstance(target, dict):
            lines.append(f"  {word:<12} {' | '.join(w or f'({word} ...)' for w in target)}")
        elif word == "":  # the default subcommand: `prefix ARGS` when ARGS does not start with a subcommand
            lines.append(f"  {'(default)':<12} {_first_doc_line(target)}")
        else:
            lines.append(f"  {word:<12} {_first_doc_line(target)}")
    return "\n".join(lines)


def _first_doc_line(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "(not available in this version)"
    import ast

    try:
        with open(spec.origin, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def invoke(config_cls: type, main_fn, argv: list[str], prog: str, doc: str | None = None) -> int:
    """Parse ``argv`` into ``config_cls`` and call ``main_fn``; user errors print without a traceback."""
    from llamalab.config import parse_config

    debug = "--debug" in argv
    try:
        cfg, debug = parse_config(config_cls, argv, prog=prog, description=doc)
        main_fn(cfg)
        return 0
    except LlamalabError as e:
        if debug:
            traceback.print_exc()
        code = getattr(e, "exit_code", 2)  # a stop on SIGTERM/SIGINT: 143/130, after its checkpoint
        print(f"{'error' if code == 2 else 'stopped'}: {e}", file=sys.stderr)
        return code
    except ImportError as e:
        if debug:
            traceback.print_exc()
        print(f"error: '{prog}' needs an optional package that is not installed: {e.name or e}. "
              f"Install the matching extra, e.g. pip install 'llamalab[all]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def stage_main(config_cls: type, main_fn) -> None:
    """For ``if __name__ == "__main__": stage_main(Config, main)`` in a stage module
    (``python -m llamalab.train.pretrain ...``, also under ``torchrun``)."""
    mod = sys.modules.get(main_fn.__module__)
    doc = (getattr(mod, "__doc__", None) or "").strip().split("\n\n")[0] or None
    spec = getattr(mod, "__spec__", None)
    sys.exit(invoke(config_cls, main_fn, sys.argv[1:], f"python -m {spec.name if spec else 'llamalab'}", doc))


def run_module(module_name: str, argv: list[str], prog: str) -> int:
    try:
        if importlib.util.find_spec(module_name) is None:
            raise LlamalabError(f"'{prog}' is not available in this version of llamalab")
        mod = importlib.import_module(module_name)
    except LlamalabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: '{prog}' needs an optional package that is not installed: {e.name or e}. "
              f"Install the matching extra, e.g. pip install 'llamalab[all]'", file=sys.stderr)
        return 2
    doc = (mod.__doc__ or "").strip()
    return invoke(mod.Config, mod.main, argv, prog, doc.split("\n\n")[0] if doc else None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table: dict = COMMANDS
    prefix = "llamalab"
    while True:
        if "" in table and (not argv or argv[0] not in table) and not (argv and argv[0] in ("-h", "--help")):
            return run_module(table[""], argv, prefix)  # the default subcommand (`llamalab release RUN`)
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(table, prefix))
            return 0 if argv else 2
        word = argv.pop(0)
        if word not in table:
            print(f"error: unknown command {word!r}\n\n{_usage(table, prefix)}", file=sys.stderr)
            return 2
        target = table[word]
        prefix = f"{prefix} {word}"
        if isinstance(target, dict):
            table = target
            continue
        return run_module(target, argv, prefix)


if __name__ == "__main__":
    sys.exit(main())
