"""``diffunlearn unlearn``: validate everything, unlearn with the trainer, write the run directory."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import flatten, run_field, to_dict
from ..data import content_hash, resolve_forget, split_images
from ..data.labels import class_counts, unlearning_labels
from ..errors import RunFailed, UserError
from ..methods import MethodSpec, flag_of
from ..model import model_summary, save_model, state_hash
from ..model.sampling import ddpm_sample
from ..runs import RunDir, check_space, prepare_out_dir, read_json, step_printer
from ..runs.cards import unlearning_card
from ..runs.summary import RequestsSummary, UnlearnSummary
from ..tracking import Tracker, check_report_to
from ..trainer import Checkpointer, TrainerConfig, accelerator
from ..verification.loop import UntilRemoved, check_until
from ..verification.report import VERIFICATION_NAME
from ..verification.results import Verification
from .deletion import keep_trained, load_inputs, space_for, train_request
from .requests import SequentialConfig, run_sequential
from .verify import audit_settings, check_options, verify_run


@dataclass
class UnlearnConfig:
    """The ``unlearn`` command's settings by concern: run I/O here, then the ``method`` block, the ``trainer`` block
    and the ``sequential`` block (deletion requests)."""
    model: str = field(default="", metadata={"help": "diffusers model directory, a run directory holding model/, or a "
                                                     "shipped model's name"})
    data: str = field(default="", metadata={"help": "data SPEC for X: image folder, .npy/.npz, or a built-in name"})
    forget: str = field(default="default", metadata={"help": "forget SPEC for A: indices, names, paths, @file, "
                                                            "class=NAME (a labelled data set's class), or 'default'"})
    out: str = run_field("out")
    overwrite: bool = run_field("overwrite")
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    allow_pickle: bool = run_field("allow_pickle")
    variant: str = field(default="", metadata={"help": "load weights saved as a variant, e.g. fp16 "
                                                       "(diffusion_pytorch_model.fp16.safetensors)"})
    log_every: int = field(default=1, metadata={"help": "print a progress line every N steps (the JSONL log has "
                                                        "every step)"})
    verify: str = field(default="fast", metadata={"help": "verify the deletion after saving the model: fast, full "
                                                          "or off (writes verification.json and report.html)"})
    audit: str = field(default="", metadata={"help": "with --verify: relearning audit relearn[:K] (fine-tune K "
                                                     "steps on X \\ A and on A's neighbours, measure A again)"})
    report_to: str = field(default="none", metadata={"help": "also log to none, tensorboard (<out>/tensorboard; pip "
                                                             "install 'diffunlearn[tracking]') or wandb (offline)"})
    sample_every: int = field(default=0, metadata={"help": "with --report-to: log 8 samples every N steps (0: at the "
                                                           "start and the end only)"})
    check_data: bool = field(default=False, metadata={"help": "decode every image file before step 1 (about "
                                                             "0.1 s per 1,000 28x28 grey PNGs, 0.6 s per 1,000 "
                                                             "256x256 RGB PNGs on one CPU core); "
                                                             "without it files are listed and their headers read, "
                                                             "and a file whose pixels do not decode is found when a "
                                                             "step first draws it"})
    cache_dir: str = run_field("cache_dir")
    until: str = field(default="", metadata={"help": "'removed': check the model every --check-every steps and stop "
                                                     "at the first step whose deletion the --verify budget confirms "
                                                     "(--max-steps is the most steps it takes); exit status 0 "
                                                     "removed, 3 not removed within --max-steps, 4 stopped by the "
                                                     "quality guard"})
    check_every: int = field(default=50, metadata={"help": "with --until removed: steps between checks (each draws "
                                                           "the targeted seeds again and the loss of A and the "
                                                           "reference images)"})
    max_steps: int = field(default=1000, metadata={"help": "with --until removed: the most steps the loop takes "
                                                          "(it replaces --steps)"})
    check_seeds: int = field(default=2048, metadata={"help": "with --until removed: seeds searched once under the "
                                                            "model before; a check confirms with the verification "
                                                            "only when none of the seeds at which that model drew A "
                                                            "draws it any more (at least the --verify budget's "
                                                            "search)"})
    method: MethodSpec = field(default_factory=MethodSpec)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sequential: SequentialConfig = field(default_factory=SequentialConfig)

    def __post_init__(self):
        # one default for any model: a strength that can be measured at the input model is, unless it is set
        self.method = self.method.measured_by_default()

    def validate(self) -> None:
        self.method.build(allow_auto=True)
        self.trainer.validate()
        self.sequential.validate()
        check_report_to(self.report_to)
        check_options(self.verify, self.audit)

        if self.until:
            if self.trainer.steps not in (TrainerConfig.steps, self.max_steps):
                raise UserError("--until removed decides the steps itself: pass --max-steps N (the most steps it "
                                f"may take, default {UnlearnConfig.max_steps}) instead of --steps")
            self.trainer.steps = self.max_steps
        elif self.max_steps != UnlearnConfig.max_steps:
            raise UserError("--max-steps applies with --until removed: add --until removed, or pass --steps N for a "
                            "fixed number of steps")
        check_until(self.until, self.verify, self.check_every, self.max_steps if self.until else self.trainer.steps,
                    self.check_seeds)
        if self.until and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--until removed checks the model in one process: start the run without accelerate "
                            "launch")
        if self.sample_every < 0:
            raise UserError(f"--sample-every must be >= 0, got {self.sample_every}")


#: settings that may differ when a run is resumed
RESUME_IGNORES = ("resume", "overwrite", "check_data", "data_fingerprint", "trainer.threads",
                  "trainer.checkpoint_every", "trainer.data_workers", "log_every", "cache_dir", "report_to",
                  "sample_every", "verify", "audit")


def run_unlearn(cfg: UnlearnConfig) -> UnlearnSummary | RequestsSummary:
    """The ``diffunlearn unlearn`` command: validate everything, then unlearn and write the run directory.

    Under ``accelerate launch`` every process runs this; only the main process writes. With ``--resume`` the run in
    ``--out`` continues from its last checkpoint (its settings must match) and ends with the same weights as an
    uninterrupted run.
    """
    cfg.validate()
    if cfg.sequential.requests:
        if cfg.resume and cfg.out:
            _check_resumable(Path(cfg.out), cfg)
        return run_sequential(cfg)
    method, trainer = cfg.method.build(allow_auto=True), cfg.trainer  # an 'auto' setting is measured when trained
    if not cfg.out:
        raise UserError("pass --out: the run directory to create")
    if not cfg.model:
        raise UserError("pass --model: a diffusers model directory")
    out = Path(cfg.out)
    if cfg.resume:
        _check_resumable(out, cfg)
        if not (out / "checkpoint.pt").is_file():
            print(f"no checkpoint in {out} yet: the run starts again from step 1", flush=True)
    else:
        prepare_out_dir(out, cfg.overwrite)
    model, data = load_inputs(cfg, out)
    forget_idx = resolve_forget(cfg.forget, data)
    fingerprint = data_fingerprint(data, forget_idx)
    if cfg.resume:
        _check_same_data(out, fingerprint)
    # class-conditional: each row is trained with its own label (matched to the model's classes by name)
    labels = unlearning_labels(model, data, forget_idx)
    if labels is not None:
        method.check_labels(*labels)
    # a latent model's images are encoded here, once, into the on-disk cache; the trainer sees only latents
    kept, forget = split_images(model.encode(data.images, "data", cfg.cache_dir or None), forget_idx)
    hash_before = state_hash(model.unet)
    needs = space_for(model, trainer, bool(cfg.until))
    if cfg.resume and Checkpointer(out / "checkpoint.pt").holds_final():
        needs = {"model": needs["model"]}  # training is done: only the model is left to write
    check_space(out, needs)
    acc = accelerator(trainer.mixed_precision)
    acc.wait_for_everyone()  # every process has validated before anything is written
    run = None
    checkpoint = Checkpointer(out / "checkpoint.pt")
    if acc.is_main_process:
        config = {"command": "unlearn", **to_dict(cfg), "data_fingerprint": fingerprint}
        run = RunDir(out, config, cfg.overwrite, resume_from=checkpoint.last_step() or 0 if cfg.resume else None)
    acc.wait_for_everyone()

    tracker = Tracker(cfg.report_to, out, config) if cfg.report_to != "none" and acc.is_main_process else None
    last: dict = {}

    def record(rec):
        last.clear()
        last.update(rec)
        run.log(rec)
        if tracker is not None:
            tracker.log(rec)

    def samples(step, unet):
        if tracker is not None and (step == trainer.steps or (cfg.sample_every and step % cfg.sample_every == 0)):
            _log_samples(tracker, type(model)(unet, model.scheduler, codec=model.codec, classes=model.classes), step)

    if tracker is not None:
        _log_samples(tracker, model, 0)
    loop = None
    if cfg.until:
        loop = UntilRemoved(model, data, forget_idx, budget=cfg.verify, check_every=cfg.check_every, seed=trainer.seed,
                            gate_seeds=cfg.check_seeds, cache_dir=cfg.cache_dir or None,
                            log=lambda m: print(m, flush=True))
        checkpoint.extra = loop  # a checkpoint keeps the loop's checks and decisions

    def callback(step, unet):
        if tracker is not None:
            samples(step, unet)
        return loop(step, unet) if loop is not None else False

    try:
        # an 'auto' strength is measured here, at the input model on this run's data
        trained = train_request(model, kept, forget, cfg.method, trainer, labels=labels, checkpoint=checkpoint,
                                log=step_printer(record, trainer.steps, cfg.log_every),
                                callback=callback if tracker is not None or loop is not None else None)
    except UserError as e:
        # bad input found late with nothing trained: a run directory this command created goes (nothing is lost);
        # one that trained steps stays, with its log (and error.txt)
        trained = isinstance(e, RunFailed) and (e.step or 1) > 1
        if run is not None and not cfg.resume and not checkpoint.exists() and not trained:
            run.remove()
        raise
    finally:
        if tracker is not None:
            tracker.finish()
    new, method, calibration = trained.model, trained.method, trained.calibration
    until = loop.summary() if loop is not None else None
    summary = UnlearnSummary(method=method.name, hyperparameters=method.hyperparameters(),
                             scaling_norm_calibration=calibration, steps=trainer.steps, kept=len(kept),
                             forget=len(forget_idx), forget_names=[data.names[i] for i in forget_idx][:50],
                             forget_classes=class_counts(data, forget_idx),
                             model_in={"dir": model.source, "sha256": hash_before},
                             model_out={"dir": str(out / "model"), "sha256": state_hash(new.unet)},
                             processes=acc.num_processes, last_step=last, model=model_summary(new), until=until,
                             exit_status=until["exit_status"] if until else None)
    if acc.is_main_process:
        removed = [{"name": data.names[i], "sha256": content_hash(data.images[i])} for i in forget_idx]

        def card(verification=None):
            return unlearning_card(summary.model_in, method.name, method.hyperparameters(), to_dict(trainer),
                                   removed, len(kept), verification, summary.forget_classes)

        # atomic: the model directory appears only when complete, its model card inside
        try:
            save_model(new, run.model_dir, extra_files={"README.md": card()}, overwrite=True)  # the run's own folder
        except OSError as e:
            keep_trained(e, checkpoint, new, last.get("step") or trainer.steps, run.model_dir)
        run.finish(summary.to_dict())
        print(f"saved {run.model_dir}")
        checkpoint.path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    if acc.is_main_process:  # the model is saved: a failed verification is recorded, the model stays

        if loop is not None:
            print(loop.line(), flush=True)
        summary.verification = verify_run(out, model, new, data, forget_idx, cfg.verify, seed=trainer.seed,
                                          result=loop.result_for(trainer.steps) if loop is not None else None,
                                          audit=audit_settings(cfg.audit, trainer.lr, trainer.batch_size,
                                                               trainer.seed), cache_dir=cfg.cache_dir or None,
                                          fresh_block=loop.fresh_from if loop is not None else 0)
        if summary.verification and summary.verification["status"] == "ok":
            _card_with_verification(out, card, summary.until)
    return summary


def _card_with_verification(out: Path, card, until: dict | None = None) -> None:
    """The model card again, now with the verification's verdicts (the figures are in verification.json)."""
    result = Verification.from_dict(read_json(out / VERIFICATION_NAME))
    lines = [f"**{result.overall.status.value}**: {result.overall.text}", ""]
    if until:
        lines = [f"Unlearned until removed (a check every {until['check_every']} steps): **{until['outcome']}**"
                 + (f" at step {until['stopped_at']}" if until["stopped_at"] else "")
                 + (f"; this model is step {until['model_is_step']}'s" if until["model_is_step"] != until["stopped_at"]
                    else "") + ".", ""] + lines
    lines += [f"- {v.label}: {v.status.value}. {v.text}" for v in result.verdicts]
    b = result.budget
    text = "\n".join(lines) + (f"\n\nMeasured by `diffunlearn verify` ({b.get('name', '')} budget: "
                                f"{b.get('resolves', '')}); the figures and the reference images are in the run's "
                                "verification.json and report.html.")
    tmp = out / "model" / ".README.md.tmp"
    tmp.write_text(card(text))
    tmp.replace(out / "model" / "README.md")


def _check_resumable(out: Path, cfg: UnlearnConfig) -> None:

    if not (out / "config.yaml").is_file():
        raise UserError(f"nothing to resume in {out}: no config.yaml (start the run without --resume)")
    if (out / "summary.json").is_file():
        raise UserError(f"the run in {out} has already finished")
    old = flatten(yaml.safe_load((out / "config.yaml").read_text()) or {})
    defaults = flatten(to_dict(UnlearnConfig()))  # a run started before an option existed used its default
    new = flatten(to_dict(cfg))
    # with --until removed the verification budget makes the loop's decisions: it must stay what it was
    ignores = [k for k in RESUME_IGNORES if not (cfg.until and k == "verify")]
    diff = [k for k, v in new.items() if k not in ignores and old.get(k, defaults.get(k)) != v]
    if diff:
        raise UserError(f"--resume needs the same settings as the run in {out}; these differ: "
                        f"{', '.join(_flag(k) for k in diff)}")


def data_fingerprint(data, forget_idx: list[int]) -> str:
    """What a resumed run must see again: the data set's size and names, and the content of every item of A (a file
    removed or replaced since would make the resumed steps unlearn another set)."""
    spec = {"n": len(data), "names": list(data.names), "forget": [content_hash(data.images[i]) for i in forget_idx]}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def _check_same_data(out: Path, fingerprint: str) -> None:

    old = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("data_fingerprint")
    if old is not None and old != fingerprint:
        raise UserError(f"the data differ from those the run in {out} started with (a file added, removed or "
                        "renamed, or an item of A changed): --resume would unlearn another set; put the data back "
                        "as it was, or start again with --overwrite")


def _flag(key: str) -> str:
    """The command-line flag of a dotted config key (``trainer.lr`` -> ``--lr``)."""
    if key == "method.name":
        return "--method"
    block, _, leaf = key.rpartition(".")
    return flag_of(leaf) if block == "method" else "--" + leaf.replace("_", "-")


def _log_samples(tracker, model, step: int) -> None:

    device = next(model.unet.parameters()).device  # sample where the UNet trains; never move it
    tracker.log_images("samples", ddpm_sample(model, 8, steps=20, seed=0, batch_size=8, device=device), step)
