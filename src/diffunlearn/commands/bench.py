"""``diffunlearn bench toy|mnist-tshirt|instance|speed|prompt``: the benchmarks (library code in
:mod:`diffunlearn.bench`, their rows in ``presets/bench/``)."""

from __future__ import annotations

import argparse
import importlib

from ..config import config_command


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
    from ..bench.toy import run_toy_bench
    from ..errors import UserError
    from ..runs import prepare_out_dir

    prepare_out_dir(args.out, args.overwrite)  # refuse a non-empty --out before anything runs
    overrides = {"ablations": True} if args.ablations else {}
    if args.workers is not None:
        if args.workers < 1:
            raise UserError("--workers must be at least 1")
        overrides["workers"] = args.workers
    results = run_toy_bench(args.out, seed=args.seed, quick=args.quick, overwrite=args.overwrite, **overrides)
    print(f"wrote {args.out}/results.md, results.json and toy.png ({results['timings']['total']:.0f} s)")
    return 0


def _config_setup(module: str, cls: str, run: str):
    def setup(p: argparse.ArgumentParser) -> None:
        mod = importlib.import_module(f"diffunlearn.bench.{module}")
        config_command(p, getattr(mod, cls), getattr(mod, run))

    return setup


#: benchmark name -> (help, setup_fn(parser)); each setup_fn adds its arguments and sets ``func``
BENCHMARKS: dict = {
    "toy": ("every unlearning method against the exact ideal denoiser of X \\ A on 8x8 digits (~1-2 min)",
            _toy_setup),
    "mnist-tshirt": ("the SISS paper's Table 2 on the shipped MNIST T-Shirt model, every method x seeds; re-runs "
                     "resume", _config_setup("mnist_tshirt", "MnistBenchConfig", "run_mnist_bench")),
    "instance": ("forget one non-duplicated training image (the paper's CelebA-HQ Table 1 and Figure 3) on the "
                 "shipped instance-base model, every method x targets; re-runs resume",
                 _config_setup("instance", "InstanceBenchConfig", "run_instance_bench")),
    "class": ("forget a whole class (EraseDiff's protocol): every method forgets the 7s of the shipped "
              "class-conditional MNIST model (or, --variant unconditional, of the unconditional one); re-runs resume",
              _config_setup("classes", "ClassBenchConfig", "run_class_bench")),
    "sampler": ("faster samplers (DPM-Solver++) against 50-step DDPM on the shipped MNIST T-Shirt model: images per "
                "second, T-shirt rate, classifier FID, paired on the same seeds",
                _config_setup("sampler", "SamplerBenchConfig", "run_sampler_bench")),
    "speed": ("seconds per step and peak memory of every method relative to a plain fine-tuning step",
              _config_setup("speed", "SpeedConfig", "run_speed_bench")),
    "prompt": ("a memorised prompt (the paper's Stable Diffusion protocol) on the shipped CPU replica prompt-digits: "
               "success and memorised count per method, on the prompt and a variant",
               _config_setup("sd_prompt", "PromptBenchConfig", "run_prompt_bench")),
    "memory": ("peak memory of unlearning runs on folders of 1,000 and 4,000 256x256 PNGs (streamed from disk)",
               _config_setup("memory", "MemoryBenchConfig", "run_memory_bench")),
    "scale": ("real-size models (DDPM CelebA-HQ 256, Stable Diffusion v1.4 shapes, random weights) through the real "
              "commands: time, peak memory, FLOPs per step and accelerator projections",
              _config_setup("scale", "ScaleConfig", "run_scale_bench")),
}


def _bench_setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (help_, setup) in BENCHMARKS.items():
        setup(sub.add_parser(name, help=help_, description=help_))


def register(commands: dict) -> None:
    """Add the ``bench`` command to the CLI's ``COMMANDS`` (name -> (help, setup_fn))."""
    commands["bench"] = ("run a benchmark: " + ", ".join(BENCHMARKS), _bench_setup)
