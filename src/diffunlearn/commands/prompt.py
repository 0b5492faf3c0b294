"""``diffunlearn prompt build|unlearn|score|train-replica`` and ``diffunlearn detect``: Stable Diffusion memorised
prompts (the library code is :mod:`diffunlearn.sd`)."""

from __future__ import annotations

from ..config import config_command

#: subcommand -> (help, module under diffunlearn.sd, config dataclass, function run with the config)
PROMPT_COMMANDS = {
    "build": ("generate images for a prompt and label them memorised (forget) or not (keep)", "workflows",
              "PromptBuildConfig", "run_build"),
    "unlearn": ("unlearn a prompt's memorised images from a Stable Diffusion UNet, counting memorised samples",
                "workflows", "PromptUnlearnConfig", "run_prompt_unlearn"),
    "score": ("count memorised samples for a prompt, with their quality", "workflows", "PromptScoreConfig",
              "run_score"),
    "train-replica": ("train the CPU replica: a tiny pixel-space text-conditional model in which one prompt mostly "
                      "reproduces a training digit", "replica", "ReplicaTrainConfig", "train_replica"),
}


def _sd(module: str):
    import importlib

    return importlib.import_module(f"diffunlearn.sd.{module}")


def _prompt_setup(parser) -> None:
    sub = parser.add_subparsers(dest="prompt_command", required=True)
    for name, (help_, module, cls, run) in PROMPT_COMMANDS.items():
        mod = _sd(module)
        config_command(sub.add_parser(name, help=help_, description=help_), getattr(mod, cls), getattr(mod, run))


def _detect_setup(parser) -> None:
    mod = _sd("detect")
    config_command(parser, mod.DetectConfig, mod.run_detect)


def register(commands: dict) -> None:
    """Add ``prompt`` and ``detect`` to the CLI's command table (name -> (help, setup_fn))."""
    commands["prompt"] = ("Stable Diffusion: build a memorised prompt's data set, unlearn it, score it", _prompt_setup)
    commands["detect"] = ("Stable Diffusion: rank prompts by how memorised they look (Wen et al. 2024)", _detect_setup)
