"""The memorised-prompt commands: ``diffunlearn prompt build|unlearn|score`` and ``diffunlearn detect``.

The SISS paper's Stable Diffusion protocol (section 5.3, Figure 6): for a memorised prompt, generate 128 images,
label them memorised (A) or not (X \\ A), unlearn A with the prompt held fixed (35 steps, batch 1 x 16, AdamW 1e-5,
SISS lambda 0.5, scaling_norm 750, gradient checkpointing), and call the run a success when 0 of 16 samples are
memorised at the end while quality holds throughout (CLIP-IQA >= 0.35). Fully memorised prompts leave no X \\ A, so
the paper builds the data from a *modified*, partially memorised prompt (tokens added or deleted by hand) and reports
success on it and on the original prompt; ``--original-prompt`` does the latter.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from ..errors import UserError
from ..runs import atomic_dir
from ..methods import MethodSpec, make_method
from ..trainer import TrainerConfig
from .memorisation import DEFAULT_THRESHOLD, LABELS_FILE, REFERENCE_FILE, RULE_FILE
from .replica import ReplicaTrainConfig, train_replica

#: the paper's Stable Diffusion hyperparameters where they differ from a method's own defaults (METHODS.md)
SD_METHOD_DEFAULTS = {"siss": {"scaling_norm": 750.0}, "siss-nois": {"scaling_norm": 750.0},
                      "erasediff-light": {"eta": 1e-2}, "retrack": {"lambda_r": 0.5}}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None


def _check_sampling(n: int, steps: int, guidance: float, batch_size: int, what: str = "--samples") -> None:
    if n < 1:
        raise UserError(f"{what} must be at least 1, got {n}")
    if steps < 1:
        raise UserError(f"--sample-steps must be at least 1, got {steps}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0, got {guidance}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


def _check_outside(out: Path, model_dir: Path, flag: str = "--out") -> None:
    o, m = out.resolve(), model_dir.resolve()
    if o == m or m in o.parents or o in m.parents:
        raise UserError(f"{flag} must not contain or be inside the model directory {m}: the input is never modified")


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
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow pickle weights (.bin/.ckpt): only for files "
                                                                "you trust"})
    overwrite: bool = field(default=False, metadata={"help": "replace a folder written by an earlier build"})


def run_build(cfg: PromptBuildConfig) -> dict:
    """Generate ``n`` images for the prompt, label them, and write the folder the user inspects before unlearning."""
    from ..runs import prepare_out_dir
    from ..sampling import save_grid
    from .memorisation import label_images, save_image, write_labels
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
    sd = load_sd(cfg.model, cfg.allow_pickle, _device(cfg.device))
    _check_outside(out, Path(sd.source))
    reference = _load_reference(cfg.reference, sd) if cfg.reference else None
    t0 = time.time()
    images = sd.sample(sd.encode_prompt(cfg.prompt), cfg.n, cfg.seed, cfg.sample_steps, cfg.guidance,
                       batch_size=cfg.batch_size, progress=cfg.n > cfg.batch_size)
    mem, rule, info = label_images(images, reference, cfg.threshold or DEFAULT_THRESHOLD, cfg.seed)
    dist = rule.distances(images)
    files = [f"images/{i:04d}.png" for i in range(cfg.n)]
    meta = {"prompt": cfg.prompt, **rule.describe(), "n": cfg.n, "memorised": int(mem.sum()),
            "seed": cfg.seed, "sample_steps": cfg.sample_steps, "guidance": cfg.guidance, "model": sd.source,
            "kmeans": info or None, "seconds": round(time.time() - t0, 2)}

    def write(folder: Path):
        (folder / "images").mkdir()
        for name, im in zip(files, images):
            save_image(im, folder / name)
        write_labels(folder, files, mem, dist)
        save_image(rule.reference, folder / REFERENCE_FILE)
        (folder / RULE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (folder / "config.yaml").write_text(yaml.safe_dump({"command": "prompt build", **asdict(cfg)}, sort_keys=False))
        for part, sel in (("forget", mem), ("keep", ~mem)):
            if sel.any():
                save_grid(images[torch.from_numpy(sel)], folder / f"{part}.png")

    atomic_dir(out, write)
    warn = ""
    if info and (mem.sum() < 2 or info["spread"]["memorised"] > 0.5 * info["spread"]["other"]):
        warn = " (no clearly tighter cluster of copies: the prompt may not be memorised)"
    print(f"{cfg.n} images for {cfg.prompt!r}: {int(mem.sum())} memorised (forget), {int((~mem).sum())} kept, "
          f"labelled by {rule.how}{warn}")
    print(f"inspect and edit {out / LABELS_FILE} (label forget or keep), then: diffunlearn prompt unlearn "
          f"--model {cfg.model} --data {out} --out RUN")
    return meta


# ---------------------------------------------------------------- scoring


def evaluate_prompt(sd, unet, prompt_embeds, uncond, rule, quality, n: int, seed: int, steps: int, guidance: float,
                    batch_size: int) -> tuple[dict, torch.Tensor]:
    """Sample ``n`` images (seeded per image) and count the memorised ones; mean quality by ``quality``."""
    images = sd.sample(prompt_embeds, n, seed, steps, guidance, batch_size=batch_size, unet=unet, uncond=uncond)
    d = rule.distances(images)
    return {"memorised": int((d <= rule.threshold).sum()), "of": n, "quality": float(np.mean(quality(images))),
            "min_distance": float(d.min())}, images


def success_report(curve: list[dict], check) -> dict:
    """The paper's success: 0 memorised at the last evaluation and quality holding at every evaluation."""
    first, last = curve[0], curve[-1]
    holds = all(check.holds(r["quality"], first["quality"]) for r in curve)
    return {"memorised_before": first["memorised"], "memorised_after": last["memorised"], "of": last["of"],
            "quality_before": first["quality"], "quality_after": last["quality"],
            "quality_min": min(r["quality"] for r in curve), "quality_holds": holds,
            "success": last["memorised"] == 0 and holds}


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
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow pickle weights: only for files you trust"})


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
    sd = load_sd(cfg.model, cfg.allow_pickle, _device(cfg.device))
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
    out: str = field(default="", metadata={"help": "run directory to create (the unlearned model goes to model/)"})
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
    overwrite: bool = field(default=False, metadata={"help": "replace a previous run directory"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow pickle weights: only for files you trust"})
    method: MethodSpec = field(default_factory=MethodSpec)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        steps=35, lr=1e-5, batch_size=1, grad_accum=16, beta1=0.9, weight_decay=1e-2, gradient_checkpointing=True))

    def build_method(self):
        """The method block with the Stable Diffusion defaults of the paper where the block does not set them."""
        kw = dict(self.method.params)
        for k, v in SD_METHOD_DEFAULTS.get(self.method.name, {}).items():
            if k not in kw and not (k == "scaling_norm" and kw.get("superfactor") is not None):
                kw[k] = v
        method = make_method(self.method.name, **kw)
        if method.from_scratch:
            raise UserError(f"{self.method.name} trains from scratch on the training set, which a prompt's generated "
                            "data set is not; choose an unlearning method")
        return method

    def validate(self) -> None:
        self.build_method()
        self.trainer.validate()


def run_prompt_unlearn(cfg: PromptUnlearnConfig) -> dict:
    """Unlearn a prompt's memorised images with the prompt held fixed; count memorised samples along the way."""
    from ..config import to_dict
    from ..models import state_hash
    from ..runs import RunDir, prepare_out_dir
    from ..sampling import save_grid
    from ..trainer import unlearn
    from .memorisation import MemorisationRule, read_prompt_data
    from .pipeline import load_sd, save_sd
    from .quality import quality_measure

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
    device = _device(cfg.device)
    sd = load_sd(cfg.model, cfg.allow_pickle, "cpu")
    _check_outside(out, Path(sd.source))
    sd.check_images(tuple(data.images.shape[1:]), f"images in {cfg.data}")
    ucfg.validate(int(sd.scheduler.config.num_train_timesteps))
    rule = (MemorisationRule(_load_reference(cfg.reference, sd), cfg.threshold or DEFAULT_THRESHOLD, "reference")
            if cfg.reference else data.rule)
    quality = quality_measure(cfg.clip, cfg.clip_iqa_floor, cfg.proxy_band, cfg.allow_pickle, device)
    if sd.vae is not None:
        sd.vae.to(device)
    sd.text_encoder.to(device)
    sd.device = device
    # the latents of X \ A and A, computed once: unlearning happens in latent space
    latents = sd.encode_images(data.images)
    mask = torch.from_numpy(data.memorised)
    kept, forget = latents[~mask], latents[mask]
    prompts = {"prompt": prompt, **({"original_prompt": cfg.original_prompt} if cfg.original_prompt else {})}
    embeds = {k: sd.encode_prompt(p) for k, p in prompts.items()}
    uncond = sd.encode_prompt("")
    hash_before = state_hash(sd.unet)

    config = {"command": "prompt unlearn", **to_dict(cfg), "method_hyperparameters": method.hyperparameters(),
              "kept": len(kept), "forget": len(forget), "quality_measure": quality.check.describe(),
              "memorisation": rule.describe()}
    run = RunDir(out, config, cfg.overwrite)
    save_grid(rule.reference[None], out / "reference.png")
    curves: dict[str, list[dict]] = {k: [] for k in prompts}
    evals = open(out / "memorised.jsonl", "a", buffering=1)

    def evaluate(step: int, unet) -> None:
        for key, emb in embeds.items():
            res, images = evaluate_prompt(sd, unet, emb, uncond, rule, quality, cfg.eval_samples, cfg.eval_seed,
                                          cfg.sample_steps, cfg.guidance, cfg.sample_batch_size)
            rec = {"step": step, "which": key, **res}
            curves[key].append(rec)
            evals.write(json.dumps(rec) + "\n")
            print(f"step {step}: {res['memorised']}/{res['of']} memorised ({key}), quality {res['quality']:.4g}",
                  flush=True)
            if step == 0 or step == ucfg.steps:
                save_grid(images, out / f"samples_{key}_{'before' if step == 0 else 'after'}.png")

    def callback(step: int, unet) -> None:
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == ucfg.steps:
            evaluate(step, unet)

    every = max(1, cfg.log_every)

    def log(rec):
        run.log(rec)
        if rec["step"] % every == 0 or rec["step"] == ucfg.steps:
            keys = [k for k in rec if k.startswith("loss_")] + ["grad_norm", "seconds"]
            print(f"step {rec['step']}/{ucfg.steps} " + " ".join(f"{k}={rec[k]:.4g}" for k in keys if k in rec),
                  flush=True)

    sd.unet.to(device)
    evaluate(0, sd.unet)
    sd.unet.to("cpu")  # the trainer trains a copy on its own device; the original need not occupy it
    new = unlearn(sd.as_unconditional(embeds["prompt"]), kept, forget, method, ucfg, log=log, callback=callback)
    evals.close()
    save_sd(sd, new.unet, run.model_dir)
    report = {k: success_report(c, quality.check) for k, c in curves.items()}
    summary = {"command": "prompt unlearn", "method": method.name, "hyperparameters": method.hyperparameters(),
               "prompts": prompts, "steps": ucfg.steps, "kept": len(kept), "forget": len(forget),
               "quality_measure": quality.name, "quality_rule": quality.check.describe(),
               "memorisation": rule.describe(), "success": report, "curve": curves,
               "model_in": {"dir": sd.source, "sha256": hash_before},
               "model_out": {"dir": str(run.model_dir), "sha256": state_hash(new.unet.unet)}}
    run.finish(summary)
    print(f"success = 0 of {cfg.eval_samples} memorised at the end and, at every count, {quality.check.describe()}")
    for k, r in report.items():
        print(f"{k}: memorised {r['memorised_before']} -> {r['memorised_after']} of {r['of']}; quality "
              f"{r['quality_before']:.4g} -> {r['quality_after']:.4g} (min {r['quality_min']:.4g}): "
              f"{'success' if r['success'] else 'not a success'}")
    print(f"saved {run.model_dir}")
    return summary


# ---------------------------------------------------------------- detect


@dataclass
class DetectConfig:
    model: str = field(default="", metadata={"help": "local Stable Diffusion v1.x diffusers directory"})
    prompts: str = field(default="", metadata={"help": "text file, one prompt per line (blank lines skipped)"})
    out: str = field(default="detect.json", metadata={"help": "JSON file to write the scores to"})
    seeds: int = field(default=4, metadata={"help": "starting noises averaged per prompt"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps (the score is taken at the first one)"})
    seed: int = field(default=0, metadata={"help": "seed of the starting noises"})
    batch_size: int = field(default=8, metadata={"help": "noises per UNet batch"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow pickle weights: only for files you trust"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out file"})


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: {e}") from None
    prompts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line)")
    return prompts


def run_detect(cfg: DetectConfig) -> dict:
    """Score every prompt by Wen et al.'s text-conditional noise magnitude; print them sorted, write JSON."""
    from ..runs import write_json
    from .detect import noise_gap_scores
    from .pipeline import load_sd

    if not cfg.model or not cfg.prompts:
        raise UserError("pass --model (a Stable Diffusion directory) and --prompts (a file, one prompt per line)")
    if cfg.seeds < 1 or cfg.sample_steps < 1 or cfg.batch_size < 1:
        raise UserError("--seeds, --sample-steps and --batch-size must be at least 1")
    out = Path(cfg.out)
    if out.is_dir() or (out.exists() and not cfg.overwrite):
        raise UserError(f"--out {out} exists: choose another file or pass --overwrite")
    prompts = read_prompts(cfg.prompts)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sd = load_sd(cfg.model, cfg.allow_pickle, _device(cfg.device))
    _check_outside(out, Path(sd.source))
    scores, t = noise_gap_scores(sd, prompts, cfg.seeds, cfg.sample_steps, cfg.seed, cfg.batch_size)
    ranked = sorted(zip(prompts, scores), key=lambda ps: -ps[1])
    result = {"model": sd.source, "measure": "mean over seeds of ||eps(x_T, t, prompt) - eps(x_T, t, '')||_2 at the "
                                             "first DDIM step (Wen et al. 2024); higher = more likely memorised",
              "timestep": t, "seeds": cfg.seeds, "seed": cfg.seed, "sample_steps": cfg.sample_steps,
              "scores": [{"prompt": p, "score": s} for p, s in ranked]}
    width = max(len(f"{s:.4g}") for s in scores)
    for p, s in ranked:
        print(f"{s:>{width}.4g}  {p}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return result


# ---------------------------------------------------------------- command line

PROMPT_COMMANDS = {
    "build": ("generate images for a prompt and label them memorised (forget) or not (keep)", PromptBuildConfig,
              run_build),
    "unlearn": ("unlearn a prompt's memorised images from a Stable Diffusion UNet, counting memorised samples",
                PromptUnlearnConfig, run_prompt_unlearn),
    "score": ("count memorised samples for a prompt, with their quality", PromptScoreConfig, run_score),
    "train-replica": ("train the CPU replica: a tiny pixel-space text-conditional model in which one prompt mostly "
                      "reproduces a training digit", ReplicaTrainConfig, train_replica),
}


def _prompt_setup(parser) -> None:
    from ..config import config_command

    sub = parser.add_subparsers(dest="prompt_command", required=True)
    for name, (help_, cls, run) in PROMPT_COMMANDS.items():
        config_command(sub.add_parser(name, help=help_, description=help_), cls, run)


def _detect_setup(parser) -> None:
    from ..config import config_command

    config_command(parser, DetectConfig, run_detect)


def register(commands: dict) -> None:
    """Add ``prompt`` and ``detect`` to the CLI's command table."""
    commands["prompt"] = ("Stable Diffusion: build a memorised prompt's data set, unlearn it, score it", _prompt_setup)
    commands["detect"] = ("Stable Diffusion: rank prompts by how memorised they look (Wen et al. 2024)", _detect_setup)


__all__ = ["PromptBuildConfig", "PromptUnlearnConfig", "PromptScoreConfig", "DetectConfig", "run_build",
           "run_prompt_unlearn", "run_score", "run_detect", "register"]
