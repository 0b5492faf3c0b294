"""Unlearning until the verdict holds (``unlearn --until removed``): a trainer callback that checks the model every
``check_every`` steps and stops the run at the first step whose deletion verifies.

Each check is cheap: the targeted seeds (the seeds among the first ``gate_seeds``, 2,048 by default, at which the model
before draws A; searched once and cached) drawn again under the current model, those of the budget's own search
first and the rest only when those are clean, and the denoising loss of A and of the reference images. When no
targeted seed draws A any more, the verification at the run's budget confirms it (the verdicts of
:func:`diffunlearn.verification.verify`); the run stops at the first confirmed check, and that model is saved.

The quality guard: the reference images' loss is judged at every check against the model before
(:func:`~diffunlearn.verification.verdicts.quality_verdict`); when it is degraded before A is removed, the run stops
and the last checked model whose quality held (the model before, at the first check) is restored and saved, and the
outcome says so. Outcomes: ``removed`` (exit status 0), ``not removed`` within the step budget (3), ``stopped by the
quality guard`` (4).

Every check is a function of the weights at its step and of fixed seeds, and a checkpoint keeps the loop's checks,
its outcome and the last checked weights whose quality held (:meth:`UntilRemoved.state_dict`), so a run resumed from
a checkpoint makes the same decisions, and records the same checks, as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from ..errors import UserError
from ..metrics.similarity import SIMILARITY_T
from ..model import DiffusionModel
from . import core, generation
from .measures import measure_model
from .results import Verification
from .verdicts import MAX_COPY_RATE, Status, copy_hits, near_copy_thresholds, quality_verdict

OUTCOMES = {"removed": 0, "not removed": 3, "stopped by the quality guard": 4}
UNTIL_CHOICES = ("", "removed")


#: seeds searched under the model before for the checks' gate (the full budget's search)
GATE_SEEDS = 2048


def check_until(until: str, verify_: str, check_every: int, steps: int, gate_seeds: int = GATE_SEEDS) -> None:
    """Bad ``--until`` settings fail before anything runs."""
    if until not in UNTIL_CHOICES:
        raise UserError(f"--until must be 'removed' (or left out), got {until!r}")
    if not until:
        return
    if verify_ == "off":
        raise UserError("--until removed stops when the verification says removed: drop --verify off")
    if check_every < 1:
        raise UserError(f"--check-every must be >= 1, got {check_every}")
    if check_every > steps:
        raise UserError(f"--check-every {check_every} is larger than --max-steps {steps}: no check would run; "
                        "lower --check-every or raise --max-steps (the most steps the loop may take)")
    if not 1 <= gate_seeds <= 100_000:
        raise UserError(f"--check-seeds must lie in [1, 100000], got {gate_seeds}")


def fresh_blocks_after(budget, gate_seeds: int) -> int:
    """The first block of fresh seeds past a gate's search of ``gate_seeds`` seeds (at least the budget's own)."""
    b = core.check_budget(budget)
    return -(-max(0, int(gate_seeds) - b.search_seeds) // b.samples)


class UntilRemoved:
    """``callback(step, unet) -> bool`` for :func:`diffunlearn.trainer.unlearn`: True stops the run."""

    def __init__(self, before: DiffusionModel, data, forget_idx: list[int], *, budget: str = "fast",
                 check_every: int = 50, seed: int = 0, gate_seeds: int = GATE_SEEDS, held_out=None, cache_dir=None,
                 similarity_t: int = SIMILARITY_T, max_copy_rate: float = MAX_COPY_RATE, log=None):
        self.before, self.data = before, core._as_imageset(data)
        self.idx, self.every, self.seed = list(forget_idx), int(check_every), int(seed)
        self.budget = core.check_budget(budget, max_copy_rate)
        self.held_out, self.cache_dir, self.similarity_t = held_out, cache_dir, similarity_t
        self.max_copy_rate = max_copy_rate
        self.say = log or (lambda _msg: None)
        b = self.budget
        self.subjects, _ = core.build_subjects(before, self.data, self.idx, b, seed, held_out)
        others = core._other_images(self.data, self.idx, held_out if held_out is not None else self.data.held_out,
                               b.neighbour_pool, seed)
        _, self.thresholds = near_copy_thresholds(self.subjects.forget, others)
        s = self.subjects
        # the gate: the seeds at which the model before drew A, over at least the budget's own search (a search
        # extends the budget's: its first seeds are the budget's); a check redraws the budget's first and the rest
        # only when those are clean, so an early check costs what the budget's targeted test costs
        gate = replace(b, search_seeds=max(b.search_seeds, int(gate_seeds)))
        self.say(f"until removed: targeted search, {gate.search_seeds} seeds under the model before ...")
        t0 = time.time()
        _, self.hits = core.targeted_seeds(before, s, self.thresholds, gate, seed, cache_dir)  # in seed order
        self.search_seconds = round(time.time() - t0, 2)  # near 0 when the search is in the cache
        self.first = sum(1 for i in self.hits if i < b.search_seeds)  # hits[:first]: the budget's own search
        self.gate_seeds = gate.search_seeds
        # fresh seeds must never have been searched: the blocks of fresh samples start after the gate's seeds (the
        # run's own final verification draws block ``fresh_from``, each confirmation one of the 63 after it)
        self.fresh_from = fresh_blocks_after(b, gate_seeds)
        # the loss of A and the reference images, as verify measures it (the same (t, eps) pairs)
        self._losses = lambda m: measure_model(m, s, None, similarity_t, seed, parts=("loss",)).values
        self.ref_before = self._losses(before)["loss_ref"].numpy()
        self.checks: list[dict] = []
        self.outcome, self.result, self.stopped_at = "not removed", None, None
        self._good: tuple[int, dict] | None = None
        self.last_verified: tuple[int, Verification] | None = None  # the last check's verification, and its step

    def model(self, unet) -> DiffusionModel:
        b = self.before
        return DiffusionModel(unet, b.scheduler, source=b.source, codec=b.codec, classes=b.classes)

    def __call__(self, step: int, unet) -> bool:
        if step % self.every:
            return False

        t0 = time.time()
        device = next(unet.parameters()).device  # sampling and verification run on the CPU; training goes on here
        try:
            return self._check(step, unet, t0)
        finally:
            unet.to(device)

    def _check(self, step: int, unet, t0: float) -> bool:
        model, s, b = self.model(unet), self.subjects, self.budget
        still, drawn = 0, 0
        for part in (self.hits[:self.first], self.hits[self.first:]):
            if still or not part:
                continue
            d, _ = generation.draw_distances(model, s.forget, part, b.sampler, b.sample_steps, self.seed,
                                             s.sample_labels_of)
            still, drawn = int(copy_hits(d, self.thresholds).sum()), drawn + len(part)
        losses = self._losses(model)
        q = quality_verdict("loss", {"before": self.ref_before, "after": losses["loss_ref"].numpy()})
        check = {"step": step, "targeted_still": still, "targeted_drawn": drawn, "targeted_of": len(self.hits),
                 "loss_a": float(losses["loss_a"].mean()), "loss_reference": float(losses["loss_ref"].mean()),
                 "loss_reference_band": [float(v) for v in np.percentile(losses["loss_ref"].numpy(), [5, 95])],
                 "quality": q["status"], **{f"quality_{k}": q.get(k) for k in ("worse_by", "stderr", "limit")}}
        stop = False
        if q["status"] == Status.DEGRADED.value:
            stop = self._guard(unet, check)
        elif still == 0:
            self.say(f"until removed: step {step}: no targeted seed draws A; confirming with the {b.name} "
                     "verification ...")
            confirmations = sum(1 for c in self.checks if "verification" in c)
            result = core.verify(model, self.data, self.idx, before=self.before, held_out=self.held_out, budget=b,
                            seed=self.seed, similarity_t=self.similarity_t, max_copy_rate=self.max_copy_rate,
                            cache_dir=self.cache_dir, fresh_block=self.fresh_from + 1 + confirmations % 63)
            check["verification"] = result.overall.status.value
            self.last_verified = (step, result)
            if result.overall.status is Status.REMOVED:
                self.outcome, self.result, self.stopped_at, stop = "removed", result, step, True
            elif result.overall.status is Status.DEGRADED:
                stop = self._guard(unet, check)
        if not stop and q["status"] == Status.KEPT.value:  # only weights whose quality was shown kept
            self._good = (step, {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()})
        check["seconds"] = round(time.time() - t0, 2)
        self.checks.append(check)
        self.say(f"until removed: step {step}: {still} of {drawn} targeted seeds drawn again draw A "
                 f"({len(self.hits)} in all), quality {q['status']}"
                 + (f", verification {check['verification']}" if "verification" in check else "")
                 + (f": {self.outcome}" if stop else ""))
        return stop

    def _guard(self, unet, check: dict) -> bool:
        """Quality degraded before A was removed: restore the last checked weights whose quality held (the model
        before when no check held) and stop."""
        step, state = self._good if self._good is not None else (0, self.before.unet.state_dict())
        unet.load_state_dict(state)
        self.outcome, self.stopped_at = "stopped by the quality guard", check["step"]
        check["restored_step"] = step
        return True

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the loop, so that a resumed run decides as an uninterrupted one: its checks,
        its outcome so far and the last checked weights whose quality held (what the quality guard restores)."""
        good_step, good = self._good if self._good is not None else (-1, {})
        return {"checks": self.checks, "outcome": self.outcome, "stopped_at": self.stopped_at,
                "good_step": good_step, "good": good}

    def load_state_dict(self, state: dict) -> None:
        self.checks = list(state.get("checks", []))
        self.outcome, self.stopped_at = state.get("outcome", "not removed"), state.get("stopped_at")
        self._good = (int(state["good_step"]), dict(state["good"])) if state.get("good_step", -1) >= 0 else None

    def result_for(self, final_step: int) -> Verification | None:
        """A verification of the model the run ends with, when a check already made one (the confirmed removal, or
        a check at the last step); None when the run must verify its model again."""
        if self.outcome == "removed":
            return self.result
        if self.outcome == "not removed" and self.last_verified and self.last_verified[0] == final_step:
            return self.last_verified[1]
        return None

    def summary(self) -> dict:
        restored = next((c["restored_step"] for c in self.checks if "restored_step" in c), None)
        return {"outcome": self.outcome, "exit_status": OUTCOMES[self.outcome], "stopped_at": self.stopped_at,
                "model_is_step": restored if restored is not None else self.stopped_at,
                "check_every": self.every, "targeted_seeds": len(self.hits), "gate_seeds": self.gate_seeds,
                "search_seconds": self.search_seconds,
                "budget": self.budget.name,
                "checks": self.checks}

    def line(self) -> str:
        s = self.summary()
        if self.outcome == "removed":
            return f"until removed: removed at step {s['stopped_at']}, confirmed by the {s['budget']} verification"
        if self.outcome == "not removed":
            return (f"until removed: not removed within the step budget ({len(self.checks)} checks); raise "
                    "--max-steps or the method's strength (e.g. --scaling-norm)")
        return (f"until removed: stopped by the quality guard at step {s['stopped_at']} (the reference images' loss "
                f"degraded); the saved model is the one of step {s['model_is_step']}, whose quality held")


__all__ = ["UntilRemoved", "OUTCOMES", "UNTIL_CHOICES", "check_until", "fresh_blocks_after"]
