"""The ``diffunlearn`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import sys

import yaml

from .config import Parser, add_dataclass_args, build_config
from .errors import UserError


# command -> (help, module, config dataclass, function run with the config)
CONFIG_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("train a base DDPM on X, or the retrain gold standard on X \\ A (with --forget)",
              "train", "TrainConfig", "train"),
    "unlearn": ("remove A from a trained model by a deletion fine-tuning method", "unlearn", "UnlearnConfig",
                "run_unlearn"),
    "sample": ("sample a PNG grid and an .npy of images, seeded per image", "sample", "SampleConfig", "run_sample"),
    "eval": ("the MNIST T-Shirt metrics of one model (T-shirt rate, NLL, classifier IS/FID)", "evaluate",
             "EvalConfig", "run_eval"),
    "demo": ("unlearn the T-shirt from the shipped MNIST model with SISS; before/after table", "demo", "DemoConfig",
             "run_demo"),
}


def _module(name: str):
    return importlib.import_module(f"diffunlearn.{name}")


def config_command(parser: argparse.ArgumentParser, cls, run, section: str | None = None) -> None:
    """A command whose options are the fields of ``cls``, plus ``--config`` and ``--dry-run``; runs ``run(cfg)``."""
    add_dataclass_args(parser, cls)
    parser.add_argument("--config", help="a YAML preset (built-in name or file); command-line flags override it")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")

    def handler(args):
        cfg = build_config(cls, args, section)
        if hasattr(cfg, "build_method"):
            cfg.build_method()  # an unknown method or a flag it does not take fails before anything runs
        if args.dry_run:
            print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
            return 0
        run(cfg)
        return 0

    parser.set_defaults(func=handler)


COMMANDS: dict = {}


def build_parser() -> argparse.ArgumentParser:
    from .bench import register

    register(COMMANDS)
    from .sd.prompt import register as register_sd

    register_sd(COMMANDS)
    from .verification.command import register as register_verify

    register_verify(COMMANDS)
    parser = Parser(prog="diffunlearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, module, cls, run) in CONFIG_COMMANDS.items():
        mod = _module(module)
        config_command(sub.add_parser(name, help=help_), getattr(mod, cls), getattr(mod, run), name)
    p = sub.add_parser("faults", help="run the fault-injection suite (every bad input, kill-and-resume trials)")
    p.add_argument("--trials", type=int, default=3, help="kill-and-resume trials")
    p.add_argument("--markdown", action="store_true", help="print the table of cases and exit")
    p.set_defaults(func=lambda a: _module("faults").run_faults(a.trials, a.markdown))
    p = sub.add_parser("ledger", help="print a deletion ledger as a table and verify its hash chain and model hash")
    p.add_argument("dir", help="a run or model directory written by `unlearn --requests`, or a ledger.jsonl file")
    p.set_defaults(func=lambda a: _module("ledger").run_ledger(a.dir))
    for name, (help_, setup) in COMMANDS.items():
        setup(sub.add_parser(name, help=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
