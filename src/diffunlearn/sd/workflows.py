"""What the memorised-prompt commands run (``diffunlearn prompt build|unlearn|score``; the command line is
:mod:`diffunlearn.commands.prompt`).

The SISS paper's Stable Diffusion protocol (section 5.3, Figure 6): for a memorised prompt, generate 128 images,
label them memorised (A) or not (X \\ A), unlearn A with the prompt held fixed (35 steps, batch 1 x 16, AdamW 1e-5,
SISS lambda 0.5, scaling_norm 750, gradient checkpointing), and call the run a success when 0 of 16 samples are
memorised at the end while quality holds throughout (CLIP-IQA >= 0.35). Fully memorised prompts leave no X \\ A, so
the paper builds the data from a *modified*, partially memorised prompt (tokens added or deleted by hand) and reports
success on it and on the original prompt; ``--original-prompt`` does the latter. The counting and the success rule
are :mod:`diffunlearn.sd.protocol`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import run_field
from ..errors import UserError
from ..methods import MethodSpec, make_method
from ..runs import atomic_dir, check_outside_model
from ..trainer import TrainerConfig
from .memorisation import DEFAULT_THRESHOLD, LABELS_FILE, REFERENCE_FILE, RULE_FILE
from .pipeline import pick_device
from .protocol import MemorisedCounter, evaluate_prompt

#: the paper's Stable Diffusion hyperparameters where they differ from a method's own defaults
SD_METHOD_DEFAULTS = {"siss": {"scaling_norm": 750.0}, "siss-nois": {"scaling_norm": 750.0},
                      "erasediff-light": {"eta": 1e-2}, "retrack": {"lambda_r": 0.5}}


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
    from .memorisation import load_image

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
    from .pipeline import load_sd

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


def build_data(sd, prompt: str, out: Path, n: int, seed: int, sample_steps: int, guidance: float,
               reference: torch.Tensor | None, threshold: float | None, batch_size: int, config: dict) -> dict:
    """``n`` images of ``prompt`` (image ``i`` from the noise of generator ``(seed, i)``), labelled memorised or not
    (by distance to ``reference``, else by k-means), written atomically to ``out`` with ``config`` as the record."""
    from ..model.sampling import save_grid
    from .memorisation import label_images, save_image, write_labels

    t0 = time.time()
    images = sd.sample(sd.encode_prompt(prompt), n, seed, sample_steps, guidance, batch_size=batch_size,
                       progress=n > batch_size)
    mem, rule, info = label_images(images, reference, threshold or DEFAULT_THRESHOLD, seed)
    dist = rule.distances(images)
    files = [f"images/{i:04d}.png" for i in range(n)]
    meta = {"prompt": prompt, **rule.describe(), "n": n, "memorised": int(mem.sum()), "seed": seed,
            "sample_steps": sample_steps, "guidance": guidance, "model": sd.source, "kmeans": info or None,
            "seconds": round(time.time() - t0, 2)}

    def write(folder: Path):
        (folder / "images").mkdir()
        for name, im in zip(files, images):
            save_image(im, folder / name)
        write_labels(folder, files, mem, dist)
        save_image(rule.reference, folder / REFERENCE_FILE)
        (folder / RULE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for part, sel in (("forget", mem), ("keep", ~mem)):
            if sel.any():
                save_grid(images[torch.from_numpy(sel)], folder / f"{part}.png")

    atomic_dir(out, write)
    warn = ""
    if info and (mem.sum() < 2 or info["spread"]["memorised"] > 0.5 * info["spread"]["other"]):
        warn = " (no clearly tighter cluster of copies: the prompt may not be memorised)"
    print(f"{n} images for {prompt!r}: {int(mem.sum())} memorised (forget), {int((~mem).sum())} kept, "
          f"labelled by {rule.how}{warn}")
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
    from .memorisation import MemorisationRule, read_prompt_data

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
    from .pipeline import load_sd
    from .quality import quality_measure

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


# ---------------------------------------------------------------- prompt unlearn


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
        from .proof import check_prompt_budget

        self.build_method()
        self.trainer.validate()
        if self.verify != "off":
            check_prompt_budget(self.verify)


def prompt_method(spec: MethodSpec):
    """The method of ``spec`` with the paper's Stable Diffusion defaults where the block does not set them; methods
    that train from scratch are refused (a prompt's generated data set is not a training set)."""
    kw = dict(spec.params)
    for k, v in SD_METHOD_DEFAULTS.get(spec.name, {}).items():
        if k not in kw and not (k == "scaling_norm" and kw.get("superfactor") is not None):
            kw[k] = v
    method = make_method(spec.name, **kw)
    if method.from_scratch:
        raise UserError(f"{spec.name} trains from scratch on the training set, which a prompt's generated "
                        "data set is not; choose an unlearning method")
    return method


def run_prompt_unlearn(cfg: PromptUnlearnConfig) -> dict:
    """Unlearn a prompt's memorised images with the prompt held fixed; count memorised samples along the way."""
    from ..config import to_dict
    from ..runs import RunDir, prepare_out_dir
    from .detect import read_prompts
    from .memorisation import MemorisationRule, read_prompt_data
    from .pipeline import load_sd
    from .proof import check_prompt_length
    from .quality import quality_measure

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


def prompt_latents(sd, data, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents of X \\ A and A, computed once (unlearning happens in latent space); the VAE and text encoder move
    to ``device`` for it and for sampling, the UNet stays where it is."""
    if sd.vae is not None:
        sd.vae.to(device)
    sd.text_encoder.to(device)
    sd.device = torch.device(device)
    latents = sd.encode_images(data.images)
    mask = torch.from_numpy(data.memorised)
    return latents[~mask], latents[mask]


def unlearn_prompt(sd, kept: torch.Tensor, forget: torch.Tensor, method, trainer: TrainerConfig,
                   counter: MemorisedCounter, run, device, log_every: int = 1, proof: dict | None = None) -> dict:
    """Unlearn ``forget`` (latents) from ``sd``'s UNet with the counter's first prompt held fixed, counting memorised
    samples before, during (the counter's steps) and after; the new SD directory goes to ``run.model_dir`` and the
    summary (the paper's success per prompt) to ``run``. ``proof`` (``{"budget", "paraphrases"}``): then verify the
    deletion (:func:`diffunlearn.sd.proof.verify_prompt`) into ``verification.json`` and ``report.html``. ``sd`` is
    not modified."""
    from ..model import state_hash
    from ..model.sampling import save_grid
    from ..runs import step_printer
    from ..trainer import unlearn
    from .pipeline import save_sd

    save_grid(counter.rule.reference[None], run.path / "reference.png")
    counter.start(run.path, trainer.steps)
    hash_before = state_hash(sd.unet)
    sd.unet.to(device)
    counter.count(0, sd.unet)
    sd.unet.to("cpu")  # the trainer trains a copy on its own device; the original need not occupy it
    new = unlearn(sd.as_unconditional(counter.embeds["prompt"]), kept, forget, method, trainer,
                  log=step_printer(run.log, trainer.steps, log_every), callback=counter)
    save_sd(sd, new.unet, run.model_dir)
    report = counter.report()
    quality = counter.quality
    summary = {"command": "prompt unlearn", "method": method.name, "hyperparameters": method.hyperparameters(),
               "prompts": counter.prompts, "steps": trainer.steps, "kept": len(kept), "forget": len(forget),
               "quality_measure": quality.name, "quality_rule": quality.check.describe(),
               "memorisation": counter.rule.describe(), "success": report, "curve": counter.curves,
               "model_in": {"dir": sd.source, "sha256": hash_before},
               "model_out": {"dir": str(run.model_dir), "sha256": state_hash(new.unet.unet)}}
    if proof is not None:
        summary["verification"] = _prove(sd, new.unet.unet, counter, run.path, proof, device)
    run.finish(summary)
    if proof is not None:
        from ..verification.report import write_report

        write_report(run.path)
    print(f"success = 0 of {counter.n} memorised at the end and, at every count, {quality.check.describe()}")
    for k, r in report.items():
        print(f"{k}: memorised {r['memorised_before']} -> {r['memorised_after']} of {r['of']}; quality "
              f"{r['quality_before']:.4g} -> {r['quality_after']:.4g} (min {r['quality_min']:.4g}): "
              f"{'success' if r['success'] else 'not a success'}")
    print(f"saved {run.model_dir}")
    return summary


def _prove(sd, unet, counter: MemorisedCounter, run_dir: Path, proof: dict, device="cpu") -> dict:
    """Verify the saved model's deletion into ``verification.json`` with both UNets on ``device``; a failure is
    recorded there, the model stays."""
    from ..runs import write_json
    from ..verification.core import failure
    from ..verification.report import VERIFICATION_NAME
    from .proof import prompt_summary_line, verify_prompt

    started = time.time()
    sd.unet.to(device)
    unet.to(device)
    try:
        v = verify_prompt(sd, unet, counter.prompts["prompt"], counter.rule, budget=proof["budget"],
                          guidance=counter.guidance, sample_steps=counter.steps, seed=counter.seed,
                          batch_size=counter.batch_size, paraphrases=proof["paraphrases"],
                          controls=proof.get("controls"), quality=counter.quality,
                          log=lambda m: print(m, flush=True))
        print(prompt_summary_line(v), flush=True)
    except KeyboardInterrupt:
        write_json(run_dir / VERIFICATION_NAME, failure("interrupted", "verification was interrupted (Ctrl-C)",
                                                          started).to_dict())
        raise
    except Exception as e:  # noqa: BLE001 - any failure is recorded; the saved model stays
        v = failure("failed", f"{type(e).__name__}: {e}", started).to_dict()
        print(f"the unlearned model is saved, but its verification failed: {v['error']}", flush=True)
    finally:
        sd.unet.to("cpu")
        unet.to("cpu")
    write_json(run_dir / VERIFICATION_NAME, v)
    head = {"status": v["status"], "file": str(run_dir / VERIFICATION_NAME)}
    if v["status"] == "ok":
        head.update(overall=v["overall"]["status"], seconds=v["seconds_total"])
    return head


__all__ = ["PromptBuildConfig", "PromptUnlearnConfig", "PromptScoreConfig", "build_data", "prompt_latents",
           "prompt_method", "run_build", "run_prompt_unlearn", "run_score", "unlearn_prompt"]
