"""What the memorised-prompt commands run (``diffunlearn prompt build|unlearn``; the commands, their settings and
their checks are :mod:`diffunlearn.commands.prompt`): building a prompt's labelled data set, its latents, the
method with the paper's Stable Diffusion defaults, and the unlearning run with its counts and its proof.

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
import time
from pathlib import Path

import torch
import yaml

from ..console import logger
from ..errors import UserError
from ..methods import MethodSpec, make_method
from ..runs import atomic_dir
from ..trainer import TrainerConfig
from .memorisation import DEFAULT_THRESHOLD, REFERENCE_FILE, RULE_FILE
from .protocol import MemorisedCounter

say = logger(__name__).info

#: the paper's Stable Diffusion hyperparameters where they differ from a method's own defaults
SD_METHOD_DEFAULTS = {"siss": {"scaling_norm": 750.0}, "siss-nois": {"scaling_norm": 750.0},
                      "erasediff-light": {"eta": 1e-2}, "retrack": {"lambda_r": 0.5}}


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
    say(f"{n} images for {prompt!r}: {int(mem.sum())} memorised (forget), {int((~mem).sum())} kept, "
          f"labelled by {rule.how}{warn}")
    return meta


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
    say(f"success = 0 of {counter.n} memorised at the end and, at every count, {quality.check.describe()}")
    for k, r in report.items():
        say(f"{k}: memorised {r['memorised_before']} -> {r['memorised_after']} of {r['of']}; quality "
              f"{r['quality_before']:.4g} -> {r['quality_after']:.4g} (min {r['quality_min']:.4g}): "
              f"{'success' if r['success'] else 'not a success'}")
    say(f"saved {run.model_dir}")
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
                          log=say)
        say(prompt_summary_line(v))
    except KeyboardInterrupt:
        write_json(run_dir / VERIFICATION_NAME, failure("interrupted", "verification was interrupted (Ctrl-C)",
                                                          started).to_dict())
        raise
    except Exception as e:  # noqa: BLE001 - any failure is recorded; the saved model stays
        v = failure("failed", f"{type(e).__name__}: {e}", started).to_dict()
        say(f"the unlearned model is saved, but its verification failed: {v['error']}")
    finally:
        sd.unet.to("cpu")
        unet.to("cpu")
    write_json(run_dir / VERIFICATION_NAME, v)
    head = {"status": v["status"], "file": str(run_dir / VERIFICATION_NAME)}
    if v["status"] == "ok":
        head.update(overall=v["overall"]["status"], seconds=v["seconds_total"])
    return head


__all__ = ["SD_METHOD_DEFAULTS", "build_data", "prompt_latents", "prompt_method", "unlearn_prompt"]
