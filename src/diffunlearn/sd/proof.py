"""Proof for a prompt deletion: does the model still draw the memorised image for its prompt, and from where?

Every count uses the run's memorisation rule (RMS pixel distance to the memorised image) and the per-image seeding of
:meth:`StableDiffusion.sample` (image ``i`` from generator ``(seed, i)``), so a seed draws the same starting noise
under the model before and after. Measures, each with its counts and the rate they could have detected:

- *targeted seeds*: the seeds at which the model before drew the memorised image, found by a search over the budget's
  seeds, drawn again under the model after;
- *fresh seeds*: seeds never searched, for the memorised rate of the prompt with its exact 95% interval;
- *reworded prompts*: the user's paraphrases (``--paraphrases FILE``) and a few token edits of the prompt (a word
  deleted or two words swapped, the way the SISS paper builds its modified prompt), before and after;
- *higher guidance*: the prompt at guidance scales above the run's, before and after;
- *detection score*: the noise-gap score of ``diffunlearn detect`` for the prompt before and after, beside the
  scores of the reworded prompts (a memorised prompt stands out on it).

A measure on which the model before did not draw the image shows *no signal*; one that draws it after is *not
removed*; the fresh rate is *removed* when no sample drew it (the budget guarantees its bound is below the target
rate). The deletion is "removed" when the targeted seeds and the fresh rate are: the model before drew the image at
the prompt's own seeds and nothing draws it now; any measure that still draws it makes it "not removed"; a model
before that drew it only from rewordings or at higher guidance gives "inconclusive", one that never drew it "no
signal".
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch

from ..console import logger
from ..errors import UserError
from ..metrics.rates import binomial_ci
from ..verification.verdicts import MAX_COPY_RATE, samples_for_rate

say = logger(__name__).info

FORMAT = "diffunlearn-prompt-verification/1"


@dataclass(frozen=True)
class PromptBudget:
    name: str
    fresh: int  # fresh samples of the prompt under the model after
    search_seeds: int  # seeds searched under the model before (targeted)
    per_variant: int  # samples per reworded prompt and per guidance scale, before and after
    detect_seeds: int = 4  # starting noises of the detection score


PROMPT_BUDGETS = {"fast": PromptBudget("fast", 400, 512, 64), "full": PromptBudget("full", 2048, 2048, 256, 16)}


def check_prompt_budget(name: "str | PromptBudget", max_rate: float = MAX_COPY_RATE) -> PromptBudget:
    if isinstance(name, PromptBudget):
        b, name = name, name.name
    elif name not in PROMPT_BUDGETS:
        raise UserError(f"unknown verification budget {name!r}: choose fast, full or off")
    else:
        b = PROMPT_BUDGETS[name]
    if not 0 < max_rate < 1:
        raise UserError(f"--max-copy-rate must lie in (0, 1), got {max_rate}")
    if b.fresh < samples_for_rate(max_rate):
        raise UserError(f"the {name} budget's {b.fresh} fresh samples cannot bound the memorised rate below "
                        f"{max_rate:.2%}: that takes {samples_for_rate(max_rate)}; use --verify full or a larger "
                        "--max-copy-rate")
    return b


def token_edits(prompt: str, k: int = 3) -> list[str]:
    """Up to ``k`` reworded prompts by token edits: the last word deleted, the first word deleted, the two middle
    words swapped (distinct, non-empty, never the prompt itself)."""
    words = prompt.split()
    out = []
    if len(words) > 1:
        out += [" ".join(words[:-1]), " ".join(words[1:])]
    if len(words) > 2:
        m = len(words) // 2
        swapped = words[:m - 1] + [words[m], words[m - 1]] + words[m + 1:]
        out.append(" ".join(swapped))
    return [p for p in dict.fromkeys(out) if p and p != prompt][:k]


def check_prompt_length(sd, prompt: str, what: str = "the prompt") -> None:
    """Refuse a prompt longer than the text encoder takes: it would be truncated silently."""
    length = min(int(sd.tokenizer.model_max_length), int(sd.text_encoder.config.max_position_embeddings))
    n = len(sd.tokenizer(prompt).input_ids)
    if n > length:
        raise UserError(f"{what} is {n} tokens long but the text encoder takes {length}: it would be truncated; "
                        "shorten it")


def _rate(k: int, n: int) -> dict:
    lo, hi = binomial_ci(k, n)
    return {"count": int(k), "n": int(n), "rate": k / n, "ci95": [round(lo, 6), round(hi, 6)]}


def _variant_status(before: int, after: int) -> str:
    return "not removed" if after else ("no signal" if before == 0 else "removed")


class _Sampler:
    """Samples of one prompt under one UNet at chosen seed numbers, counted by the rule."""

    def __init__(self, sd, rule, steps: int, seed: int, batch_size: int):
        self.sd, self.rule, self.steps, self.seed, self.batch_size = sd, rule, steps, seed, batch_size
        self.uncond = sd.encode_prompt("")

    def draw(self, unet, prompt: str, indices, guidance: float) -> tuple[np.ndarray, torch.Tensor]:
        idx = [int(i) for i in indices]
        if not idx:
            return np.zeros(0, bool), torch.empty((0, *self.sd.image_shape))
        x = self.sd.sample(self.sd.encode_prompt(prompt), len(idx), self.seed, self.steps, guidance,
                           batch_size=self.batch_size, unet=unet, uncond=self.uncond, indices=idx)
        return self.rule.distances(x) <= self.rule.threshold, x


def verify_prompt(sd, unet_after, prompt: str, rule, *, budget: "str | PromptBudget" = "fast", guidance: float = 7.5,
                  sample_steps: int = 50, seed: int = 0, batch_size: int = 8, paraphrases: list[str] | None = None,
                  guidance_scales: list[float] | None = None, max_rate: float = MAX_COPY_RATE, log=None,
                  controls: list[str] | None = None, quality=None) -> dict:
    """Measure whether ``unet_after`` still draws the image ``rule`` recognises for ``prompt``, against ``sd``'s own
    UNet (the model before). ``controls``: unrelated prompts on which ``quality`` (a measure of
    :mod:`diffunlearn.sd.quality`) must hold from before to after. Returns what ``verification.json`` holds (with
    the targeted seeds' images, base64)."""
    from ..runs.images import encode_image
    from .detect import noise_gap_scores

    say = log or (lambda _msg: None)
    t0 = time.time()
    b = check_prompt_budget(budget, max_rate)
    check_prompt_length(sd, prompt)
    reworded = list(dict.fromkeys([*(paraphrases or []), *token_edits(prompt)]))
    for p in paraphrases or []:
        check_prompt_length(sd, p, f"paraphrase {p!r}")
    scales = sorted({float(g) for g in (guidance_scales or [1.5 * guidance, 2.0 * guidance]) if g > guidance})
    s = _Sampler(sd, rule, sample_steps, seed, batch_size)
    before = sd.unet
    seconds = {}

    say(f"verify: targeted search, {b.search_seeds} seeds of the prompt under the model before ...")
    t = time.time()
    hit_before, _ = s.draw(before, prompt, range(b.search_seeds), guidance)
    hits = [int(i) for i in np.flatnonzero(hit_before)]
    still_mask, x_after = s.draw(unet_after, prompt, hits, guidance)
    still = [h for h, m in zip(hits, still_mask) if m]
    show = (still + [h for h in hits if h not in still])[:8]
    _, x_before = s.draw(before, prompt, show, guidance)
    pos = {h: k for k, h in enumerate(hits)}
    seconds["targeted"] = time.time() - t
    targeted = {"measure": "targeted seeds", "searched": b.search_seeds, "hits_before": len(hits),
                "still_after": len(still), "seeds_still": still,
                "status": "no signal" if not hits else ("not removed" if still else "removed"),
                "text": (f"the model before drew the image at none of {b.search_seeds} seeds: nothing to redraw"
                         if not hits else f"{len(still)} of the {len(hits)} seeds (of {b.search_seeds} searched) at "
                         "which the model before drew the image still draw it")}

    say(f"verify: {b.fresh} fresh samples of the prompt under the unlearned model ...")
    t = time.time()
    fresh_idx = range(b.search_seeds, b.search_seeds + b.fresh)
    fresh_hit, _ = s.draw(unet_after, prompt, fresh_idx, guidance)
    k = int(fresh_hit.sum())
    fr = _rate(k, b.fresh)
    bound = fr["ci95"][1]
    fresh = {"measure": "fresh seeds", **fr, "first_seed": b.search_seeds, "target_rate": max_rate,
             "status": "not removed" if k else "removed",  # the budget's check guarantees bound <= max_rate
             "text": (f"{k} of {b.fresh} fresh samples drew the image: rate {fr['rate']:.2%} (95% CI "
                      f"{fr['ci95'][0]:.2%}-{bound:.2%})" if k else
                      f"none of {b.fresh} fresh samples drew the image: the rate lies below {bound:.2%} (95%)")}
    seconds["fresh"] = time.time() - t

    t = time.time()
    variants = []
    for kind, p, g in ([("reworded", p, guidance) for p in reworded] + [("guidance", prompt, g) for g in scales]):
        say(f"verify: {kind} {p!r} at guidance {g:g}, {b.per_variant} samples before and after ...")
        idx = range(b.search_seeds + b.fresh, b.search_seeds + b.fresh + b.per_variant)
        hb, _ = s.draw(before, p, idx, g)
        ha, _ = s.draw(unet_after, p, idx, g)
        nb, na = int(hb.sum()), int(ha.sum())
        status = _variant_status(nb, na)
        variants.append({"measure": kind, "prompt": p, "guidance": g, "before": _rate(nb, b.per_variant),
                         "after": _rate(na, b.per_variant), "status": status,
                         "text": f"{nb} -> {na} of {b.per_variant} samples drew the image"
                                 + ("" if status != "removed" else
                                    f" (after: below {binomial_ci(0, b.per_variant)[1]:.1%}, 95%)")})
    seconds["variants"] = time.time() - t

    t = time.time()
    probe = [prompt, *reworded]
    sb, _ = noise_gap_scores(sd, probe, b.detect_seeds, sample_steps, seed, batch_size)
    sa, _ = noise_gap_scores(dataclasses.replace(sd, unet=unet_after), probe, b.detect_seeds, sample_steps, seed,
                             batch_size)
    detect = {"measure": "detection score", "prompts": probe, "before": [round(x, 6) for x in sb],
              "after": [round(x, 6) for x in sa], "seeds": b.detect_seeds,
              "text": f"noise-gap score of the prompt {sb[0]:.4g} -> {sa[0]:.4g}"
                      + (f"; of its reworded prompts, median {np.median(sb[1:]):.4g} -> {np.median(sa[1:]):.4g}"
                         if len(probe) > 1 else "")}
    seconds["detect"] = time.time() - t

    quality_result = _control_quality(s, before, unet_after, controls or [], quality, guidance,
                                      range(b.search_seeds + b.fresh, b.search_seeds + b.fresh + b.per_variant), say)
    verdicts = [targeted, fresh, *variants]
    statuses = [v["status"] for v in verdicts]
    # "removed" rests on the prompt itself: seeds at which the model before drew the image at the prompt's own
    # guidance, none of which draws it now, and a fresh rate bounded below the target
    if "not removed" in statuses:
        status = "not removed"
    elif targeted["status"] == "removed" and fresh["status"] == "removed":
        status = "removed"
    elif any(v["status"] == "removed" for v in variants):
        status = "inconclusive"
    else:
        status = "no signal"
    words = {"removed": "the prompt no longer draws the memorised image", "not removed":
             "the model still draws the memorised image", "no signal": "the model before never drew the image here, "
             "so its absence after proves nothing", "inconclusive": "the model before drew the image only from "
             "reworded prompts or at higher guidance, not at the prompt's own seeds, so nothing shows it removed "
             "there"}[status]
    n_total = b.fresh + len(hits) + 2 * b.per_variant * len(variants)
    overall = {"status": status, "quality": quality_result["status"],
               "text": f"{words}: {fresh['text']}; targeted: {targeted['text']}; "
                       f"{sum(v['status'] == 'not removed' for v in variants)} of {len(variants)} reworded prompts "
                       f"and guidance scales still draw it ({n_total} samples after in all); quality on unrelated "
                       f"prompts: {quality_result['status']}"}
    return {"format": FORMAT, "status": "ok", "kind": "prompt",
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "prompt": prompt, "budget": dataclasses.asdict(b), "guidance": guidance, "sample_steps": sample_steps,
            "seed": seed, "memorisation": rule.describe(), "verdicts": verdicts, "detect": detect,
            "quality": quality_result,
            "overall": overall, "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "seconds_total": round(time.time() - t0, 2),
            "images": {"targeted": {"seeds": show, "before": [encode_image(x) for x in x_before],
                                    "after": [encode_image(x_after[pos[h]]) for h in show]}}}


def _control_quality(s: _Sampler, before, after, controls: list[str], quality, guidance: float, idx, say) -> dict:
    """Mean quality of each unrelated prompt's samples before and after, and whether it holds by the measure's
    rule; "not tested" without control prompts."""
    if not controls or quality is None:
        return {"status": "not tested", "text": "quality on unrelated prompts was not measured (pass "
                "--control-prompts FILE); the run's quality counts on the prompt itself are in summary.json"}
    rows = []
    for p in controls:
        say(f"verify: quality on {p!r}, {len(idx)} samples before and after ...")
        qb = float(np.mean(quality(s.draw(before, p, idx, guidance)[1])))
        qa = float(np.mean(quality(s.draw(after, p, idx, guidance)[1])))
        rows.append({"prompt": p, "before": round(qb, 6), "after": round(qa, 6),
                     "holds": bool(quality.check.holds(qa, qb))})
    broken = [r["prompt"] for r in rows if not r["holds"]]
    return {"status": "degraded" if broken else "kept", "measure": quality.name, "rule": quality.check.describe(),
            "prompts": rows, "samples": len(idx),
            "text": (f"{quality.name} on {len(rows)} unrelated prompt(s), {len(idx)} samples each before and after: "
                     + (f"degraded on {', '.join(map(repr, broken))}" if broken else
                        f"kept ({quality.check.describe()})"))}


def prompt_summary_line(v: dict) -> str:
    return f"verification: {v['overall']['status']}. {v['overall']['text']}"


__all__ = ["PROMPT_BUDGETS", "PromptBudget", "check_prompt_budget", "check_prompt_length", "prompt_summary_line",
           "token_edits", "verify_prompt"]
