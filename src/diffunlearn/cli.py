"""The ``diffunlearn`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys

import yaml

from .config import Parser, add_dataclass_args, build_config
from .errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML preset (built-in name or file); command-line flags override it")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")


def _train(args):
    from .train import TrainConfig, train

    cfg = build_config(TrainConfig, args, "train")
    if args.dry_run:
        return _print_cfg(cfg)
    train(cfg)


def _unlearn(args):
    from .unlearn import UnlearnConfig, run_unlearn

    cfg = build_config(UnlearnConfig, args, "unlearn")
    cfg.build_method()  # unknown method or a flag it does not take fails before anything runs
    if args.dry_run:
        return _print_cfg(cfg)
    summary = run_unlearn(cfg)
    print(f"saved {summary['model_out']['dir']}")


def _sample(args):
    from .sample import SampleConfig, run_sample

    cfg = build_config(SampleConfig, args, "sample")
    if args.dry_run:
        return _print_cfg(cfg)
    run_sample(cfg)


def _eval(args):
    from .evaluate import EvalConfig, run_eval

    cfg = build_config(EvalConfig, args, "eval")
    if args.dry_run:
        return _print_cfg(cfg)
    run_eval(cfg)


def _demo(args):
    from .demo import DemoConfig, run_demo

    cfg = build_config(DemoConfig, args, "demo")
    if args.dry_run:
        return _print_cfg(cfg)
    run_demo(cfg)


def _print_cfg(cfg) -> int:
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


COMMANDS = {}


def _register_commands() -> None:
    from .bench import register

    register(COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    _register_commands()
    parser = Parser(prog="diffunlearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a base DDPM on X, or the retrain gold standard on X \\ A (with --forget)")
    add_dataclass_args(p, TrainConfig)
    _common(p)
    p.set_defaults(func=_train)
    from .sample import SampleConfig
    from .unlearn import UnlearnConfig

    p = sub.add_parser("unlearn", help="remove A from a trained model by a deletion fine-tuning method")
    add_dataclass_args(p, UnlearnConfig)
    _common(p)
    p.set_defaults(func=_unlearn)
    p = sub.add_parser("sample", help="sample a PNG grid and an .npy of images, seeded per image")
    add_dataclass_args(p, SampleConfig)
    _common(p)
    p.set_defaults(func=_sample)
    from .demo import DemoConfig
    from .evaluate import EvalConfig

    p = sub.add_parser("eval", help="the MNIST T-Shirt metrics of one model (T-shirt rate, NLL, classifier IS/FID)")
    add_dataclass_args(p, EvalConfig)
    _common(p)
    p.set_defaults(func=_eval)
    p = sub.add_parser("demo", help="unlearn the T-shirt from the shipped MNIST model with SISS; before/after table")
    add_dataclass_args(p, DemoConfig)
    _common(p)
    p.set_defaults(func=_demo)
    p = sub.add_parser("faults", help="run the fault-injection suite (every bad input, kill-and-resume trials)")
    p.add_argument("--trials", type=int, default=3, help="kill-and-resume trials")
    p.add_argument("--markdown", action="store_true", help="print the table of cases and exit")
    p.set_defaults(func=lambda a: __import__("diffunlearn.faults", fromlist=["run_faults"]).run_faults(a.trials, a.markdown))
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
