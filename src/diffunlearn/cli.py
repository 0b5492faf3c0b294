"""diffunlearn: remove training images from a trained diffusion model without retraining it, and measure how well
they were removed. Each command has its own --help with an example; presets (--config) are YAML files whose settings
nest by concern (method:, trainer:, sequential:)."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from .config import Parser, config_command
from .errors import UserError

# command -> (help, module, config dataclass, function run with the config)
CONFIG_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("train a base DDPM on X, or the retrain gold standard on X \\ A (with --forget)",
              "commands.train", "TrainConfig", "train"),
    "unlearn": ("remove A from a trained model by a deletion fine-tuning method", "commands.unlearn", "UnlearnConfig",
                "run_unlearn"),
    "sample": ("sample a PNG grid and an .npy of images, seeded per image", "commands.sample", "SampleConfig",
               "run_sample"),
    "eval": ("the MNIST T-Shirt metrics of one model (T-shirt rate, NLL, classifier IS/FID)", "commands.evaluate",
             "EvalConfig", "run_eval"),
    "demo": ("unlearn the T-shirt from the shipped MNIST model with SISS; before/after table",
             "commands.demo", "DemoConfig", "run_demo"),
}


#: one example per command, shown at the end of its --help
EXAMPLES = {
    "train": "diffunlearn train --data mnist-tshirt --forget default --out runs/retrain"
             "   # the gold standard on X \\ A",
    "unlearn": "diffunlearn unlearn --model instance-base --data instance-digits --forget 7 --until removed "
               "--out runs/forget-7\n"
               "diffunlearn unlearn --config mnist-tshirt --method naive --out runs/naive   # a preset, another method",
    "sample": "diffunlearn sample --model runs/forget-7 --n 64 --out runs/samples",
    "eval": "diffunlearn eval --model runs/naive --preset mnist-tshirt --out runs/eval",
    "demo": "diffunlearn demo --out runs/demo",
}


def _module(name: str):
    return importlib.import_module(f"diffunlearn.{name}")


COMMANDS: dict = {}


def build_parser() -> argparse.ArgumentParser:
    from .commands import bench, prompt, verify

    bench.register(COMMANDS)
    prompt.register(COMMANDS)
    verify.register(COMMANDS)
    parser = Parser(prog="diffunlearn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffunlearn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, module, cls, run) in CONFIG_COMMANDS.items():
        mod = _module(module)
        p = sub.add_parser(name, help=help_, description=help_, epilog="example:\n  " + EXAMPLES[name].replace(
            "\n", "\n  "), formatter_class=argparse.RawDescriptionHelpFormatter)
        config_command(p, getattr(mod, cls), getattr(mod, run), name)
    p = sub.add_parser("faults", help="run the fault-injection suite (every bad input, kill-and-resume trials)")
    p.add_argument("--trials", type=int, default=3, help="kill-and-resume trials")
    p.add_argument("--markdown", action="store_true", help="print the table of cases and exit")
    p.set_defaults(func=lambda a: _module("faults").run_faults(a.trials, a.markdown))
    p = sub.add_parser("ledger", help="print a deletion ledger as a table and verify its hash chain and model hash")
    p.add_argument("dir", help="a run or model directory written by `unlearn --requests`, or a ledger.jsonl file")
    p.set_defaults(func=lambda a: _module("commands.ledger").run_ledger(a.dir))
    for name, (help_, setup) in COMMANDS.items():
        setup(sub.add_parser(name, help=help_))
    return parser


def _version() -> str:
    from .runs.cards import tool_version

    return tool_version()


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and its subcommands (for "did you mean")."""
    out: set[str] = set()
    for action in parser._actions:
        out.update(o for o in action.option_strings if o.startswith("--"))
        for child in ((getattr(action, "choices", None) or {}).values()
                      if isinstance(action, argparse._SubParsersAction) else ()):
            out |= _options(child)
    return out


def main(argv: list[str] | None = None) -> int:
    import difflib

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        flag = next((x for x in extra if x.startswith("-")), extra[0])
        name = flag.split("=")[0]
        subs = {k: v for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                for k, v in a.choices.items()}
        own = _options(subs[args.command]) if args.command in subs else _options(parser)
        elsewhere = sorted(k for k, sub in subs.items() if name in _options(sub))
        close = difflib.get_close_matches(name, sorted(own), n=1)
        if elsewhere and name not in own:
            hint = f": it is an option of diffunlearn {' / '.join(elsewhere)}, not of {args.command} (see --help)"
        else:
            hint = f": did you mean {close[0]}?" if close else " (see --help)"
        print(f"error: diffunlearn {args.command}: unrecognized argument {flag}{hint}", file=sys.stderr)
        return 2
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: disk full while writing {e.filename or 'the results'}: free space and rerun "
                  "(--resume continues from the last checkpoint)", file=sys.stderr)
        else:
            print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
