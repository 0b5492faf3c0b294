"""The memorised-prompt protocol: the SISS paper's Stable Diffusion protocol (section 5.3, Figure 6).

For a memorised prompt, ``n`` generated images are labelled memorised (A) or not (X \\ A)
(:mod:`diffunlearn.sd.memorisation`); A is unlearned with the prompt held fixed, and along the way a fixed set of
``eval_samples`` samples (seeded per image, so every count sees the same starting noises) is generated for the prompt
(and, scored only, the original prompt) and the memorised ones counted, with the mean quality
(:mod:`diffunlearn.sd.quality`). A run is a success when 0 samples are memorised at the last count while quality
holds at every count; a benchmark's success rate is the share of its runs (seeds) that succeed.

A CPU replica (``prompt-digits``, :mod:`diffunlearn.sd.replica`) names its prompt, variant and known memorised image
in ``replica.json`` beside its model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..console import logger
from ..errors import UserError

say = logger(__name__).info


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


def success_rate(cells: list[dict], which: str) -> dict:
    """The share of runs that succeed on prompt ``which`` (``prompt`` or ``original_prompt``, the variant)."""
    ok = [bool(c["success"][which]["success"]) for c in cells]
    return {"successes": sum(ok), "runs": len(ok), "rate": sum(ok) / len(ok) if ok else float("nan")}


class MemorisedCounter:
    """Counts the memorised samples of each prompt (``prompts``: key -> text) at the steps of a run: step 0 by
    :meth:`count`, then as a trainer callback every ``every`` steps (0: only the last) and at the last step. Each count
    goes to ``memorised.jsonl`` in the run directory, with the sample grids before and after; the prompt embeddings
    are encoded once and serve every run (:meth:`start` begins one)."""

    def __init__(self, sd, rule, quality, prompts: dict[str, str], n: int, seed: int, steps: int, guidance: float,
                 batch_size: int, every: int):
        self.sd, self.rule, self.quality, self.prompts = sd, rule, quality, prompts
        self.n, self.seed, self.steps, self.guidance, self.batch_size, self.every = (n, seed, steps, guidance,
                                                                                     batch_size, every)
        self.embeds = {k: sd.encode_prompt(p) for k, p in prompts.items()}
        self.uncond = sd.encode_prompt("")
        self.out, self.last, self.curves = None, 0, {}

    def start(self, out: Path, last: int) -> None:
        self.out, self.last, self.curves = Path(out), last, {k: [] for k in self.prompts}

    def count(self, step: int, unet) -> None:
        from ..model.sampling import save_grid

        for key, emb in self.embeds.items():
            res, images = evaluate_prompt(self.sd, unet, emb, self.uncond, self.rule, self.quality, self.n, self.seed,
                                          self.steps, self.guidance, self.batch_size)
            rec = {"step": step, "which": key, **res}
            self.curves[key].append(rec)
            with open(self.out / "memorised.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            say(f"step {step}: {res['memorised']}/{res['of']} memorised ({key}), quality {res['quality']:.4g}")
            if step == 0 or step == self.last:
                save_grid(images, self.out / f"samples_{key}_{'before' if step == 0 else 'after'}.png")

    def __call__(self, step: int, unet) -> None:
        if (self.every and step % self.every == 0) or step == self.last:
            self.count(step, unet)

    def report(self) -> dict:
        return {k: success_report(c, self.quality.check) for k, c in self.curves.items()}


def resolve_replica(model: str, prompt: str = "", variant: str = "", label: str = "kmeans", sample_steps: int = 0,
                    guidance: float = 0.0) -> dict:
    """The model directory, the replica's description (``replica.json`` beside or above it; {} if none) and the
    settings that follow from it (given values win; sampling defaults DDIM 50 steps, guidance 7.5)."""
    from ..pretrained import available, pretrained_dir
    from .pipeline import resolve_sd_dir
    from .replica import REPLICA_FILE

    p = Path(model)
    if not p.exists() and model in available():
        p = pretrained_dir(model)
    model_dir = resolve_sd_dir(p)
    info = {}
    for folder in (model_dir, model_dir.parent):
        if (folder / REPLICA_FILE).is_file():
            info = json.loads((folder / REPLICA_FILE).read_text())
            info["folder"] = str(folder)
            break
    prompt, variant = prompt or info.get("prompt", ""), variant or info.get("variant", "")
    if not prompt or not variant:
        raise UserError(f"{model_dir} has no {REPLICA_FILE} naming its prompts: pass --prompt and --variant")
    reference = None
    if label == "reference":
        if not info.get("memorised_image"):
            raise UserError(f"--label reference needs the known training image: no {REPLICA_FILE} beside {model_dir}")
        reference = str(Path(info["folder"]) / info["memorised_image"])
    return {"model_dir": str(model_dir), "prompt": prompt, "variant": variant, "reference": reference,
            "sample_steps": sample_steps or int(info.get("sample_steps", 50)),
            "guidance": guidance or float(info.get("guidance", 7.5)), "replica": info}


def data_quality(quality, data) -> dict:
    """Mean quality of a data set's memorised (A) and not memorised (X \\ A) samples: the scale against which to read
    a change of quality (a model that makes X \\ A-like samples instead of copies of A scores about kept / memorised
    of its value before unlearning, with nothing broken)."""
    return {"measure": quality.name, "memorised": float(np.mean(quality(data.forget))),
            "kept": float(np.mean(quality(data.kept)))}


def reference_distance(replica: dict, data_dir: Path) -> float | None:
    """RMS pixel distance between a data set's reference (the medoid of A) and the replica's real training image: how
    well the labelling found the memorised image (0 = it is the training image)."""
    from .memorisation import REFERENCE_FILE, load_image, pixel_features, rms_distance

    if not replica.get("memorised_image"):
        return None
    ref = load_image(Path(data_dir) / REFERENCE_FILE)
    true = load_image(Path(replica["folder"]) / replica["memorised_image"], tuple(ref.shape[-2:]))
    return float(rms_distance(pixel_features(ref[None]), pixel_features(true[None])[0])[0])


__all__ = ["MemorisedCounter", "data_quality", "evaluate_prompt", "reference_distance", "resolve_replica",
           "success_rate", "success_report"]
