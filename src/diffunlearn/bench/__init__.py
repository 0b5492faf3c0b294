"""Benchmarks: ``diffunlearn bench toy`` (exact gold standard on 8x8 digits); more (``bench mnist-tshirt``,
``bench instance``, ``bench prompt``, ...) plug in as entries of :data:`BENCHMARKS`.

The command line registers through :func:`register`, which adds ``bench`` to ``cli.COMMANDS``.
"""

from __future__ import annotations

import argparse

def check_bench_dir(root, cfg, free: tuple[str, ...]) -> None:
    """A benchmark directory is resumable only with the settings it was started with (``free`` settings may differ
    between runs); any other non-empty directory is refused. ``cfg`` is the benchmark's config dataclass."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from ..errors import UserError

    root = Path(root)
    stored = root / "config.json"
    if stored.exists():
        try:
            prev = json.loads(stored.read_text())
        except ValueError:
            raise UserError(f"{stored} is not valid JSON: choose another --out") from None
        defaults = asdict(type(cfg)())
        diff = [k for k, v in asdict(cfg).items() if k not in free and prev.get(k, defaults[k]) != v]
        if diff:
            raise UserError(f"{root} holds a benchmark with other settings ({', '.join(diff)}): choose another --out")
    elif root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists, is not empty and holds no benchmark: choose another --out")


#: benchmark name -> (help, setup_fn(parser)); each setup_fn adds its arguments and sets ``func``
BENCHMARKS: dict = {}


def _toy_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench-toy", help="output directory (default: runs/bench-toy)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the trainings, unlearning runs and probes")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test in well under a minute")
    p.add_argument("--ablations", action="store_true",
                   help="also run SISS lambda = 0 and lambda = 1 (the paper's ablations)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, one torch thread each (default: 2, or 1 with --quick)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_toy_run)


def _toy_run(args) -> int:
    from ..errors import UserError
    from ..runs import prepare_out_dir
    from .toy import run_toy_bench

    prepare_out_dir(args.out, args.overwrite)  # refuse a non-empty --out before anything runs
    overrides = {"ablations": True} if args.ablations else {}
    if args.workers is not None:
        if args.workers < 1:
            raise UserError("--workers must be at least 1")
        overrides["workers"] = args.workers
    results = run_toy_bench(args.out, seed=args.seed, quick=args.quick, overwrite=args.overwrite, **overrides)
    print(f"wrote {args.out}/results.md, results.json and toy.png ({results['timings']['total']:.0f} s)")
    return 0


BENCHMARKS["toy"] = ("every unlearning method against the exact ideal denoiser of X \\ A on 8x8 digits (~1-2 min)",
                     _toy_setup)


def _mnist_setup(p: argparse.ArgumentParser) -> None:
    from ..config import config_command
    from .mnist_tshirt import MnistBenchConfig, run_mnist_bench

    config_command(p, MnistBenchConfig, run_mnist_bench)


BENCHMARKS["mnist-tshirt"] = ("the SISS paper's Table 2 on the shipped MNIST T-Shirt model, every method x seeds; "
                              "re-runs resume", _mnist_setup)


def _instance_setup(p: argparse.ArgumentParser) -> None:
    from ..config import config_command
    from .instance import InstanceBenchConfig, run_instance_bench

    config_command(p, InstanceBenchConfig, run_instance_bench)


BENCHMARKS["instance"] = ("forget one non-duplicated training image (the paper's CelebA-HQ Table 1 and Figure 3) on "
                          "the shipped instance-base model, every method x targets; re-runs resume", _instance_setup)


def _speed_setup(p: argparse.ArgumentParser) -> None:
    from ..config import config_command
    from .speed import SpeedConfig, run_speed_bench

    config_command(p, SpeedConfig, run_speed_bench)


BENCHMARKS["speed"] = ("seconds per step and peak memory of every method relative to a plain fine-tuning step",
                       _speed_setup)


def _prompt_setup(p: argparse.ArgumentParser) -> None:
    from ..config import config_command
    from .prompt import PromptBenchConfig, run_prompt_bench

    config_command(p, PromptBenchConfig, run_prompt_bench)


BENCHMARKS["prompt"] = ("a memorised prompt (the paper's Stable Diffusion protocol) on the shipped CPU replica "
                        "prompt-digits: success and memorised count per method, on the prompt and a variant",
                        _prompt_setup)


def _scale_setup(p: argparse.ArgumentParser) -> None:
    from ..config import config_command
    from .scale import ScaleConfig, run_scale_bench

    config_command(p, ScaleConfig, run_scale_bench)


BENCHMARKS["scale"] = ("real-size models (DDPM CelebA-HQ 256, Stable Diffusion v1.4 shapes, random weights) through "
                       "the real commands: time, peak memory, FLOPs per step and accelerator projections", _scale_setup)


def _bench_setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (help_, setup) in BENCHMARKS.items():
        setup(sub.add_parser(name, help=help_, description=help_))


def register(commands: dict) -> None:
    """Add the ``bench`` command to the CLI's ``COMMANDS`` (name -> (help, setup_fn))."""
    commands["bench"] = ("run a benchmark: " + ", ".join(BENCHMARKS), _bench_setup)


__all__ = ["BENCHMARKS", "register"]
