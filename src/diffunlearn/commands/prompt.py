"""``diffunlearn prompt build|unlearn|score|train-replica`` and ``diffunlearn detect``: Stable Diffusion memorised
prompts. The settings, checks and run functions of ``prompt build``, ``unlearn`` and ``score`` are here, those of
``train-replica`` in :mod:`.replica` and of ``detect`` in :mod:`.detect`; what they run is the library in
:mod:`diffunlearn.sd`."""

from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import config_command, run_field
from ..console import logger
from ..errors import UserError
from ..methods import MethodSpec
from ..runs import check_outside_model
from ..sd.detect import read_prompts
from ..sd.memorisation import DEFAULT_THRESHOLD, LABELS_FILE
from ..sd.pipeline import pick_device
from ..sd.protocol import MemorisedCounter, evaluate_prompt
from ..sd.workflows import build_data, prompt_latents, prompt_method, unlearn_prompt
from ..trainer import TrainerConfig

say = logger(__name__).info


def _check_sampling(n: int, steps: int, guidance: float, batch_size: int, what: str = "--samples") -> None:
    if n < 1:
        raise UserError(f"{what} must be at least 1, got {n}")
    if steps < 1:
        raise UserError(f"--sample-steps must be at least 1, got {steps}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0, got {guidance}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


def _load_reference(path: str, sd) -> torch.Tensor:
    from ..sd.memorisation import load_image

    if not Path(path).is_file():
        raise UserError(f"reference image not found: {path}")
    return load_image(Path(path), sd.image_shape[1:])


def _check_threshold(threshold: float | None) -> None:
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"--threshold is an RMS pixel distance in (0, 1], got {threshold}")


# ---------------------------------------------------------------- prompt build



@dataclass
class PromptBuildConfig:
    model: str = field(default="", metadata={"help": "local Stable Diffusion v1.x diffusers directory"})
    prompt: str = field(default="", metadata={"help": "the prompt (the paper: a modified, partially memorised one)"})
    out: str = field(default="", metadata={"help": "folder to create: images/, labels.csv, reference.png, "
                                                   "memorisation.json, forget.png, keep.png"})
    n: int = field(default=128, metadata={"help": "images to generate"})
    seed: int = field(default=0, metadata={"help": "image i starts from the noise of generator (seed, i)"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM sampling steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    reference: str = field(default="", metadata={"help": "the known memorised image: label by distance to it instead "
                                                         "of by k-means"})
    threshold: float | None = field(default=None, metadata={"help": "with --reference: memorised iff the RMS pixel "
                                                                    "distance (pixels in [0, 1]) <= this (default "
                                                                    f"{DEFAULT_THRESHOLD})"})
    batch_size: int = field(default=8, metadata={"help": "images per sampling batch (does not change the images)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = run_field("threads")
    allow_pickle: bool = run_field("allow_pickle")
    overwrite: bool = run_field("overwrite", help="replace a folder written by an earlier build")


def run_build(cfg: PromptBuildConfig) -> dict:
    """Generate ``n`` images for the prompt, label them, and write the folder the user inspects before unlearning."""
    from ..runs import prepare_out_dir
    from ..sd.pipeline import load_sd

    if not cfg.prompt.strip():
        raise UserError("pass --prompt: the prompt to build the data set for")
    if not cfg.model or not cfg.out:
        raise UserError("pass --model (a Stable Diffusion directory) and --out (the folder to create)")
    if cfg.n < 2:
        raise UserError(f"--n must be at least 2 (some memorised, some not), got {cfg.n}")
    _check_sampling(cfg.n, cfg.sample_steps, cfg.guidance, cfg.batch_size, "--n")
    _check_threshold(cfg.threshold)
    if cfg.threshold is not None and not cfg.reference:
        raise UserError("--threshold applies only with --reference (k-means sets its own threshold)")
    out = prepare_out_dir(cfg.out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sd = load_sd(cfg.model, cfg.allow_pickle, pick_device(cfg.device))
    check_outside_model(out, sd.source)
    reference = _load_reference(cfg.reference, sd) if cfg.reference else None
    meta = build_data(sd, cfg.prompt, out, cfg.n, cfg.seed, cfg.sample_steps, cfg.guidance, reference,
                      cfg.threshold, cfg.batch_size, {"command": "prompt build", **asdict(cfg)})
    print(f"inspect and edit {out / LABELS_FILE} (label forget or keep), then: diffunlearn prompt unlearn "
          f"--model {cfg.model} --data {out} --out RUN")
    return meta



# ---------------------------------------------------------------- scoring


@dataclass
class PromptScoreConfig:
    model: str = field(default="", metadata={"help": "Stable Diffusion directory (or a prompt unlearn run directory)"})
    prompt: str = field(default="", metadata={"help": "prompt to score (default: the one --data was built for)"})
    data: str = field(default="", metadata={"help": "folder from `prompt build`: its labels define memorised"})
    reference: str = field(default="", metadata={"help": "or: the memorised image itself"})
    threshold: float | None = field(default=None, metadata={"help": "with --reference: RMS pixel distance threshold "
                                                                    f"(default {DEFAULT_THRESHOLD})"})
    samples: int = field(default=16, metadata={"help": "samples to generate"})
    seed: int = field(default=1, metadata={"help": "sampling seed (default differs from build's 0: fresh samples)"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM sampling steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    clip: str = field(default="", metadata={"help": "local CLIP directory for CLIP-IQA (default: weight-free "
                                                    "sharpness proxy)"})
    out: str = field(default="", metadata={"help": "also write the result as JSON here"})
    batch_size: int = field(default=8, metadata={"help": "images per sampling batch"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = run_field("threads")
    allow_pickle: bool = run_field("allow_pickle")


def _rule_for(data: str, reference: str, threshold: float | None, sd):
    from ..sd.memorisation import MemorisationRule, read_prompt_data

    _check_threshold(threshold)
    if threshold is not None and not reference:
        raise UserError("--threshold applies only with --reference")
    if reference:
        return MemorisationRule(_load_reference(reference, sd), threshold or DEFAULT_THRESHOLD, "reference"), None
    if not data:
        raise UserError("pass --data (a folder from `prompt build`) or --reference: what counts as memorised")
    pd = read_prompt_data(data)
    return pd.rule, pd


def run_score(cfg: PromptScoreConfig) -> dict:
    """Count memorised samples of one model for one prompt, with their quality."""
    from ..sd.pipeline import load_sd
    from ..sd.quality import quality_measure

    _check_sampling(cfg.samples, cfg.sample_steps, cfg.guidance, cfg.batch_size)
    if not cfg.model:
        raise UserError("pass --model: a Stable Diffusion directory")
    if cfg.out and Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a directory: give a file name")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sd = load_sd(cfg.model, cfg.allow_pickle, pick_device(cfg.device))
    rule, pd = _rule_for(cfg.data, cfg.reference, cfg.threshold, sd)
    prompt = cfg.prompt or (pd.prompt if pd else None)
    if not prompt:
        raise UserError("pass --prompt (the data folder names none)")
    sd.check_images(tuple(rule.reference.shape), "the reference image's sizes")
    quality = quality_measure(cfg.clip, device=sd.device)
    res, _ = evaluate_prompt(sd, None, sd.encode_prompt(prompt), None, rule, quality, cfg.samples, cfg.seed,
                             cfg.sample_steps, cfg.guidance, cfg.batch_size)
    res = {"model": sd.source, "prompt": prompt, **res, "quality_measure": quality.name, "rule": rule.describe()}
    print(f"{res['memorised']} of {res['of']} samples memorised for {prompt!r}; {quality.name}: {res['quality']:.4g}")
    if cfg.out:
        from ..runs import write_json

        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(cfg.out), res)
    return res


@dataclass
class PromptUnlearnConfig:
    model: str = field(default="", metadata={"help": "local Stable Diffusion v1.x diffusers directory"})
    data: str = field(default="", metadata={"help": "folder from `diffunlearn prompt build` (labels.csv: forget = A)"})
    out: str = run_field("out")
    prompt: str = field(default="", metadata={"help": "prompt held fixed while unlearning (default: the data's)"})
    original_prompt: str = field(default="", metadata={"help": "the original, fully memorised prompt: also scored"})
    eval_every: int = field(default=5, metadata={"help": "count memorised samples every N steps (0: before and "
                                                         "after only)"})
    eval_samples: int = field(default=16, metadata={"help": "samples per count (the paper: 16)"})
    eval_seed: int = field(default=1, metadata={"help": "sampling seed of the counts: the same images every time"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM sampling steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    reference: str = field(default="", metadata={"help": "the memorised image: count by distance to it (default: "
                                                         "the data folder's rule)"})
    threshold: float | None = field(default=None, metadata={"help": "with --reference: RMS pixel distance threshold"})
    clip: str = field(default="", metadata={"help": "local CLIP directory: quality by CLIP-IQA (default: the "
                                                    "weight-free sharpness proxy)"})
    clip_iqa_floor: float = field(default=0.35, metadata={"help": "CLIP-IQA must stay at or above this"})
    proxy_band: float = field(default=2.0, metadata={"help": "without CLIP: sharpness must stay within this factor "
                                                             "of its value before unlearning"})
    sample_batch_size: int = field(default=8, metadata={"help": "images per sampling batch"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda (sampling; training follows Accelerate)"})
    log_every: int = field(default=1, metadata={"help": "print a progress line every N steps"})
    overwrite: bool = run_field("overwrite", help="replace a previous run directory")
    allow_pickle: bool = run_field("allow_pickle")
    verify: str = field(default="fast", metadata={"help": "verify the deletion after saving: fast (400 fresh samples, "
                                                          "512 searched seeds, 64 per reworded prompt and guidance "
                                                          "scale), full (2,048 / 2,048 / 256) or off; writes "
                                                          "verification.json and report.html"})
    paraphrases: str = field(default="", metadata={"help": "text file of reworded prompts (one per line) to verify "
                                                           "beside the token edits generated from the prompt"})
    control_prompts: str = field(default="", metadata={"help": "text file of unrelated prompts on which the "
                                                               "verification checks that quality holds (the run's "
                                                               "quality measure)"})
    method: MethodSpec = field(default_factory=MethodSpec)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        steps=35, lr=1e-5, batch_size=1, grad_accum=16, beta1=0.9, weight_decay=1e-2, gradient_checkpointing=True))

    def build_method(self):
        return prompt_method(self.method)

    def validate(self) -> None:
        from ..sd.proof import check_prompt_budget

        self.build_method()
        self.trainer.validate()
        if self.verify != "off":
            check_prompt_budget(self.verify)



def run_prompt_unlearn(cfg: PromptUnlearnConfig) -> dict:
    """Unlearn a prompt's memorised images with the prompt held fixed; count memorised samples along the way."""
    from ..config import to_dict
    from ..runs import RunDir, prepare_out_dir
    from ..sd.memorisation import MemorisationRule, read_prompt_data
    from ..sd.pipeline import load_sd
    from ..sd.proof import check_prompt_length
    from ..sd.quality import quality_measure

    cfg.validate()
    method = cfg.build_method()
    if not cfg.model or not cfg.data or not cfg.out:
        raise UserError("pass --model (a Stable Diffusion directory), --data (a folder from `prompt build`) and --out")
    ucfg = cfg.trainer
    ucfg.validate()
    if cfg.eval_every < 0:
        raise UserError(f"--eval-every must be >= 0, got {cfg.eval_every}")
    _check_sampling(cfg.eval_samples, cfg.sample_steps, cfg.guidance, cfg.sample_batch_size, "--eval-samples")
    _check_threshold(cfg.threshold)
    if cfg.threshold is not None and not cfg.reference:
        raise UserError("--threshold applies only with --reference")
    if not (cfg.proxy_band > 1 and 0 <= cfg.clip_iqa_floor <= 1):
        raise UserError("--proxy-band must be > 1 and --clip-iqa-floor within [0, 1]")
    out = prepare_out_dir(cfg.out, cfg.overwrite)
    data = read_prompt_data(cfg.data)
    prompt = cfg.prompt or data.prompt
    if not prompt:
        raise UserError(f"pass --prompt: {cfg.data} does not say which prompt it was built for")
    if ucfg.threads:
        torch.set_num_threads(ucfg.threads)
    device = pick_device(cfg.device)
    sd = load_sd(cfg.model, cfg.allow_pickle, "cpu")
    check_outside_model(out, sd.source)
    sd.check_images(tuple(data.images.shape[1:]), f"images in {cfg.data}")
    paraphrases = read_prompts(cfg.paraphrases) if cfg.paraphrases else []
    controls = read_prompts(cfg.control_prompts) if cfg.control_prompts else []
    for p in [prompt, *paraphrases, *controls]:
        check_prompt_length(sd, p, "the prompt" if p == prompt else f"prompt {p!r}")
    ucfg.validate(int(sd.scheduler.config.num_train_timesteps))
    rule = (MemorisationRule(_load_reference(cfg.reference, sd), cfg.threshold or DEFAULT_THRESHOLD, "reference")
            if cfg.reference else data.rule)
    quality = quality_measure(cfg.clip, cfg.clip_iqa_floor, cfg.proxy_band, cfg.allow_pickle, device)
    kept, forget = prompt_latents(sd, data, device)
    prompts = {"prompt": prompt, **({"original_prompt": cfg.original_prompt} if cfg.original_prompt else {})}
    counter = MemorisedCounter(sd, rule, quality, prompts, cfg.eval_samples, cfg.eval_seed, cfg.sample_steps,
                               cfg.guidance, cfg.sample_batch_size, cfg.eval_every)
    config = {"command": "prompt unlearn", **to_dict(cfg), "method_hyperparameters": method.hyperparameters(),
              "kept": len(kept), "forget": len(forget), "quality_measure": quality.check.describe(),
              "memorisation": rule.describe()}
    run = RunDir(out, config, cfg.overwrite)
    proof = None if cfg.verify == "off" else {"budget": cfg.verify, "paraphrases": paraphrases, "controls": controls}
    return unlearn_prompt(sd, kept, forget, method, ucfg, counter, run, device, cfg.log_every, proof)


#: subcommand -> (help, module under diffunlearn (this one, or the Stable Diffusion package), config dataclass,
#: function run with the config)
PROMPT_COMMANDS = {
    "build": ("generate images for a prompt and label them memorised (forget) or not (keep)", "commands.prompt",
              "PromptBuildConfig", "run_build"),
    "unlearn": ("unlearn a prompt's memorised images from a Stable Diffusion UNet, counting memorised samples",
                "commands.prompt", "PromptUnlearnConfig", "run_prompt_unlearn"),
    "score": ("count memorised samples for a prompt, with their quality", "commands.prompt", "PromptScoreConfig",
              "run_score"),
    "train-replica": ("train the CPU replica: a tiny pixel-space text-conditional model in which one prompt mostly "
                      "reproduces a training digit", "commands.replica", "ReplicaTrainConfig", "train_replica"),
}


def _sd(module: str):
    return importlib.import_module(f"diffunlearn.{module}")


def _prompt_setup(parser) -> None:
    sub = parser.add_subparsers(dest="prompt_command", required=True)
    for name, (help_, module, cls, run) in PROMPT_COMMANDS.items():
        mod = _sd(module)
        config_command(sub.add_parser(name, help=help_, description=help_), getattr(mod, cls), getattr(mod, run))


def _detect_setup(parser) -> None:
    from .detect import DetectConfig, run_detect

    config_command(parser, DetectConfig, run_detect)


def register(commands: dict) -> None:
    """Add ``prompt`` and ``detect`` to the CLI's command table (name -> (help, setup_fn))."""
    commands["prompt"] = ("Stable Diffusion: build a memorised prompt's data set, unlearn it, score it", _prompt_setup)
    commands["detect"] = ("Stable Diffusion: rank prompts by how memorised they look (Wen et al. 2024)", _detect_setup)
