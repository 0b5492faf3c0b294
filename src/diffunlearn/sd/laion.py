"""A CPU replica whose memorisation looks like LAION's, to show whether ``diffunlearn detect`` finds memorised prompts.

In LAION (and so in Stable Diffusion) almost every caption is distinct, and memorisation comes from a few
caption-image pairs duplicated many times (Carlini et al. 2023; Webster 2023); guidance above 1 amplifies their
copies. ``diffunlearn prompt train-replica --layout laion`` builds that at 8x8:

- every training digit of scikit-learn's ``load_digits()`` used gets its own caption ``"<adjective> <style> of
  <digit word>"`` (12 x 10 x 10 = 1,200 possible captions, shuffled with a fixed seed), so a caption names one
  image, as in LAION;
- ``memorised`` of those pairs are each added ``copies`` times more (the duplicated pairs);
- the evaluation scores every memorised caption, as many captions that were trained once, and as many that were
  never trained (the same grammar), with Wen et al.'s detector (:func:`diffunlearn.sd.detect.noise_gap_scores`),
  and reports the ROC AUC of memorised against the rest; beside it, how often each memorised caption reproduces its
  image at guidance 1, 1.5, 2 and the configured guidance (whether guidance amplifies the copies).

The text encoder, UNet, training and model layout are those of :mod:`.replica`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

ADJECTIVES = ("bold", "thin", "slanted", "tiny", "wide", "neat", "messy", "round", "sharp", "faint", "dark", "tall")
STYLES = ("sketch", "scan", "photo", "drawing", "print", "stamp", "note", "card", "label", "poster")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption(adj: int, style: int, digit: int) -> str:
    return f"{ADJECTIVES[adj]} {STYLES[style]} of {DIGIT_WORDS[digit]}"


def laion_words() -> list[str]:
    return sorted(set(ADJECTIVES) | set(STYLES) | set(DIGIT_WORDS) | {"of"})


@dataclass
class LaionData:
    images: torch.Tensor  # (N, 3, 8, 8) in [-1, 1]: every training pair's image
    captions: list[str]  # every training pair's caption
    memorised_prompts: list[str]  # the duplicated pairs' captions
    memorised_images: torch.Tensor  # (M, 3, 8, 8): their images
    once_prompts: list[str]  # captions of pairs trained once (``evaluate_per`` x memorised of them)
    unseen_prompts: list[str]  # captions never trained
    counts: dict


def laion_data(n_captions: int = 600, memorised: int = 4, copies: int = 40, evaluate_per: int = 8,
               seed: int = 0) -> LaionData:
    """The captioned pairs (see the module docstring): ``n_captions`` distinct digits with distinct captions (the
    caption's digit word is the image's class), ``memorised`` of them duplicated ``copies`` extra times; for the
    evaluation, ``evaluate_per`` x ``memorised`` captions trained once and as many never trained."""
    from sklearn.datasets import load_digits

    grid = len(ADJECTIVES) * len(STYLES)
    if memorised < 1 or copies < 1 or evaluate_per < 1:
        raise UserError("--memorised, --copies and the evaluation count must be at least 1")
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    per_digit = {c: list(rng.permutation(np.flatnonzero(d.target == c))) for c in range(10)}
    names = {c: list(rng.permutation(grid)) for c in range(10)}  # caption slots per digit word
    n_unseen = evaluate_per * memorised
    if not memorised + evaluate_per * memorised <= n_captions <= 10 * grid - n_unseen - 10:
        raise UserError(f"--n-captions must lie in [{memorised * (1 + evaluate_per)}, {10 * grid - n_unseen - 10}]")
    idx, caps = [], []
    for k in range(n_captions):  # digits in turn, so every word is used about equally
        c = k % 10
        if not per_digit[c] or not names[c]:
            raise UserError(f"--n-captions {n_captions} is more than load_digits() holds of digit {c}")
        slot = names[c].pop()
        idx.append(int(per_digit[c].pop()))
        caps.append(caption(slot // len(STYLES), slot % len(STYLES), c))
    pick = rng.permutation(n_captions)
    mem = [int(i) for i in pick[:memorised]]
    once = [caps[int(i)] for i in pick[memorised:memorised + n_unseen]]
    unseen = []
    for k in range(n_unseen):
        c = k % 10
        slot = names[c].pop()
        unseen.append(caption(slot // len(STYLES), slot % len(STYLES), c))
    images_idx = idx + [idx[i] for i in mem for _ in range(copies)]
    captions = caps + [caps[i] for i in mem for _ in range(copies)]
    arr = torch.from_numpy(x[images_idx]) * 2 - 1
    images = arr[:, None].expand(-1, 3, -1, -1).contiguous()
    mem_images = (torch.from_numpy(x[[idx[i] for i in mem]]) * 2 - 1)[:, None].expand(-1, 3, -1, -1).contiguous()
    counts = {"pairs": len(captions), "distinct_captions": n_captions, "memorised": memorised, "copies": copies,
              "copies_share": memorised * copies / len(captions), "evaluated_once": len(once),
              "evaluated_unseen": len(unseen)}
    return LaionData(images, captions, [caps[i] for i in mem], mem_images, once, unseen, counts)


#: guidance scales at which the copies are always counted: at 1 the conditional model alone; whether guidance
#: amplifies copies shows between 1 and 2 (larger scales overshoot on 8x8 pixels)
GUIDANCE_LADDER = (1.0, 1.5, 2.0)


def evaluate_laion(sd, data: LaionData, guidance: float, samples: int, sample_steps: int, threshold: float,
                   detect_seeds: int = 4) -> dict:
    """Wen et al.'s detector on memorised, trained-once and unseen captions (AUC of memorised against each), and how
    often each memorised caption reproduces its image at each scale of :data:`GUIDANCE_LADDER` and ``guidance``."""
    from ..metrics.membership import roc_auc
    from .detect import noise_gap_scores
    from .memorisation import memorisation_rates

    prompts = data.memorised_prompts + data.once_prompts + data.unseen_prompts
    scores, t = noise_gap_scores(sd, prompts, seeds=detect_seeds, steps=sample_steps)
    m = len(data.memorised_prompts)
    mem, once, unseen = scores[:m], scores[m:m + len(data.once_prompts)], scores[m + len(data.once_prompts):]
    rates = {}
    for g in sorted({*GUIDANCE_LADDER, float(guidance)}):
        per = [memorisation_rates(sd, data.memorised_images[i], {"p": p}, samples, sample_steps, g, threshold)["p"]
               for i, p in enumerate(data.memorised_prompts)]
        rates[f"guidance {g:g}"] = per
    return {"detect": {"timestep": t, "seeds": detect_seeds,
                       "auc_vs_trained_once": roc_auc(mem, once), "auc_vs_unseen": roc_auc(mem, unseen),
                       "auc_vs_all": roc_auc(mem, once + unseen),
                       "scores": {"memorised": dict(zip(data.memorised_prompts, mem)),
                                  "trained_once": dict(zip(data.once_prompts, once)),
                                  "unseen": dict(zip(data.unseen_prompts, unseen))}},
            "memorisation": rates}


__all__ = ["LaionData", "evaluate_laion", "laion_data", "laion_words"]
