"""``diffunlearn verify`` (is it gone? before/after evidence for any models: :func:`run_verify` with
:class:`VerifyConfig`, or a prompt deletion's proof), :func:`verify_run` (the verification ``unlearn`` runs after
saving its model, for a single request and for ``--requests``) and ``diffunlearn report`` (a run's report.html from
its files)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import config_command, run_field
from ..console import logger
from ..errors import UserError
from ..metrics.similarity import SIMILARITY_T
from ..runs import write_json
from ..verification.core import failure, verify
from ..verification.measures import BUDGETS
from ..verification.report import REPORT_NAME, VERIFICATION_NAME, write_report
from ..verification.results import Verification
from ..verification.verdicts import MAX_COPY_RATE

say = logger(__name__).info

VERIFY_CHOICES = ("fast", "full", "off")


@dataclass
class VerifyConfig:
    model: str = field(default="", metadata={"help": "the model to verify: diffusers directory, run directory or "
                                                     "shipped name (unlearned by any tool)"})
    data: str = field(default="", metadata={"help": "data SPEC of X, the set the model was trained on"})
    forget: str = field(default="", metadata={"help": "forget SPEC of A within X: indices, names, @file, default"})
    before: str = field(default="", metadata={"help": "the model before the deletion (adds before -> after and the "
                                                      "quality check)"})
    reference: str = field(default="", metadata={"help": "a model retrained on X \\ A (the gold standard), measured "
                                                         "the same way"})
    held_out: str = field(default="", metadata={"help": "data SPEC of images never trained on (reference images; "
                                                        "default: the data set's own, else kept images)"})
    budget: str = field(default="fast", metadata={"help": (
        "fast: " + BUDGETS["fast"].resolves() + "; 1-3 minutes on MNIST 28x28 on one thread. full: "
        + BUDGETS["full"].resolves() + "; 7-16 minutes on MNIST (docs/performance.md: the costs at 28x28, "
        "128x128 and 256x256)").replace("%", "%%")})
    max_copy_rate: float = field(default=MAX_COPY_RATE, metadata={"help": "the copy rate the generation test must "
                                                                          "rule out: a budget whose fresh samples "
                                                                          "cannot is an error (default 0.01: 1%%)"})
    samples: int = field(default=0, metadata={"help": "fresh samples of the generation test instead of the "
                                                      "budget's (0: the budget's)"})
    out: str = field(default="", metadata={"help": "directory to create: verification.json, report.html"})
    audit: str = field(default="", metadata={"help": "relearn[:K]: fine-tune K steps (default 50) on X \\ A and on "
                                                     "A's nearest neighbours, then measure A again"})
    audit_lr: float = field(default=5e-5, metadata={"help": "relearning audit: AdamW learning rate"})
    audit_batch_size: int = field(default=32, metadata={"help": "relearning audit: batch size"})
    sscd: str = field(default="", metadata={"help": "local SSCD TorchScript file for the similarity (default: "
                                                    "weight-free pixel cosine)"})
    similarity_t: int = field(default=SIMILARITY_T, metadata={"help": "noise-and-denoise: noise to this step"})
    seed: int = field(default=0, metadata={"help": "seed of every measure's noise, the samples and the reference"})
    threads: int = run_field("threads")
    overwrite: bool = run_field("overwrite", help="replace a previous verification directory")
    allow_pickle: bool = run_field("allow_pickle")
    prompt: str = field(default="", metadata={"help": "verify a Stable Diffusion prompt deletion instead: the prompt "
                                                      "(--model and --before are SD directories, --data the folder "
                                                      "of `prompt build` whose rule says what is memorised)"})
    paraphrases: str = field(default="", metadata={"help": "with --prompt: text file of reworded prompts to verify "
                                                           "beside the generated token edits"})
    control_prompts: str = field(default="", metadata={"help": "with --prompt: text file of unrelated prompts on "
                                                               "which quality must hold before -> after"})
    clip: str = field(default="", metadata={"help": "with --prompt and --control-prompts: local CLIP directory for "
                                                    "CLIP-IQA (default: the weight-free sharpness proxy)"})
    guidance: float = field(default=7.5, metadata={"help": "with --prompt: classifier-free guidance scale"})
    sample_steps: int = field(default=50, metadata={"help": "with --prompt: DDIM sampling steps"})


def audit_settings(spec: str, lr: float, batch_size: int, seed: int):
    """The :class:`~diffunlearn.verification.audit.AuditSettings` of ``--audit relearn[:K]``, or None."""
    from ..verification.audit import AuditSettings, parse_audit

    steps = parse_audit(spec)
    return None if steps is None else AuditSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed)


def check_options(verify_: str, audit: str) -> None:
    """Bad ``--verify`` / ``--audit`` values fail before anything runs."""
    if verify_ not in VERIFY_CHOICES:
        raise UserError(f"--verify must be one of {', '.join(VERIFY_CHOICES)}, got {verify_!r}")
    from ..verification.audit import parse_audit

    parse_audit(audit)
    if audit and verify_ == "off":
        raise UserError("--audit needs verification: drop --verify off")
    if audit and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--audit fine-tunes in one process: start the run without accelerate launch, or run "
                        "`diffunlearn verify --audit` on its model afterwards")


def _write_verify_dir(out: Path, cfg: VerifyConfig, record: dict) -> None:
    """``verify``'s directory, made atomically: its settings (config.yaml), ``record`` (verification.json) and the
    report rendered from them."""
    from ..runs import atomic_dir

    def write(folder: Path) -> None:
        (folder / "config.yaml").write_text(yaml.safe_dump({"command": "verify", **asdict(cfg)}, sort_keys=False))
        write_json(folder / VERIFICATION_NAME, record)
        write_report(folder)

    atomic_dir(out, write)


def run_verify(cfg: VerifyConfig) -> Verification:
    """The ``diffunlearn verify`` command: every input is checked before anything is measured or written."""

    from ..data import load_data, resolve_forget
    from ..model import load_model
    from ..runs import prepare_out_dir
    from ..verification.core import check_budget, check_models

    for name in ("model", "data", "forget", "out"):
        if not getattr(cfg, name):
            raise UserError(f"pass --{name}" + {"model": ": the model to verify", "data": ": the data set X",
                                                "forget": ": the items of X that were removed",
                                                "out": ": the directory to write"}[name])
    budget = check_budget(cfg.budget, cfg.max_copy_rate, cfg.samples or None)
    audit = audit_settings(cfg.audit, cfg.audit_lr, cfg.audit_batch_size, cfg.seed)
    out = prepare_out_dir(cfg.out, cfg.overwrite)
    data = load_data(cfg.data)
    forget_idx = resolve_forget(cfg.forget, data)
    roles = {"after": cfg.model, "before": cfg.before, "retrained": cfg.reference}
    models = {r: load_model(p, allow_pickle=cfg.allow_pickle) for r, p in roles.items() if p}
    check_models(models, data.shape)
    held_set = load_data(cfg.held_out) if cfg.held_out else None
    held = held_set.images if held_set is not None else None
    held_y = None
    if held is not None:
        models["after"].check_images(tuple(held.shape[1:]), "held-out")
        if models["after"].conditional:  # a class-conditional model measures each image under its own class
            from ..data.labels import labels_for_model

            held_y = labels_for_model(held_set, models["after"].classes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    try:
        result = verify(models["after"], data, forget_idx, before=models.get("before"),
                        retrained=models.get("retrained"), held_out=held, held_out_labels=held_y, budget=budget,
                        sscd=cfg.sscd or None,
                        seed=cfg.seed, similarity_t=cfg.similarity_t, audit=audit, log=say,
                        max_copy_rate=cfg.max_copy_rate)
        error = None
    except FloatingPointError as e:  # a model with non-finite outputs: a finding, recorded like a result
        result, error = failure("failed", str(e), started), str(e)

    _write_verify_dir(out, cfg, result.to_dict())
    if error:
        say(f"wrote {out / VERIFICATION_NAME} and {out / REPORT_NAME} (verification failed)")
        raise UserError(error)
    say(result.line())
    say(f"wrote {out / VERIFICATION_NAME} and {out / REPORT_NAME}")
    return result


def verify_run(run_dir: str | Path, before, after, data, forget_idx, budget: str = "fast", *, held_out=None,
               sscd: str | None = None, seed: int = 0, similarity_t: int = SIMILARITY_T, audit=None,
               log=say, cache_dir: str | None = None, result: Verification | None = None, fresh_block: int = 0
               ) -> dict | None:
    """Verify a finished run and write ``verification.json`` and ``report.html`` into ``run_dir``.

    The model is already saved when this runs: whatever happens here (an exception, non-finite outputs, Ctrl-C)
    leaves it in place; ``verification.json`` then records the error (status ``failed`` or ``interrupted``) and the
    report says what is missing. Ctrl-C is re-raised after recording. ``result``: a verification of ``after``
    already made, recorded as it is. ``fresh_block``: the block of fresh seeds to draw (past seeds an ``--until
    removed`` gate searched). Returns the result's headline, or None when ``budget`` is ``off``."""
    if budget == "off":
        return None
    run_dir = Path(run_dir)
    started = time.time()
    if result is not None:  # already verified (unlearn --until removed confirmed this very model)
        pass
    else:
        try:
            result = verify(after, data, forget_idx, before=before, held_out=held_out, budget=budget, sscd=sscd,
                            seed=seed, similarity_t=similarity_t, audit=audit, log=log, cache_dir=cache_dir,
                            fresh_block=fresh_block)
        except KeyboardInterrupt:
            result = failure("interrupted", "verification was interrupted (Ctrl-C) before it finished; missing: "
                                            "every verdict. The targeted search keeps the seeds it finished in the "
                                            "cache (verify-search/), so the next verification resumes it", started)
            _record(run_dir, result, log)
            raise
        except Exception as e:  # noqa: BLE001 - any failure is recorded; the saved model stays
            result = failure("failed", f"{type(e).__name__}: {e}", started)
    _record(run_dir, result, log)
    return {**result.headline(), "file": str(run_dir / VERIFICATION_NAME),
            "seconds_with_report": round(time.time() - started, 2)}


def _record(run_dir: Path, result: Verification, log) -> None:
    try:
        write_json(run_dir / VERIFICATION_NAME, result.to_dict())
    except OSError as e:
        log(f"verification.json could not be written: {e}")
        return
    try:
        write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the report is a view of files that are already written
        log(f"report.html could not be written ({type(e).__name__}: {e}); `diffunlearn report {run_dir}` retries")
    if result.ok:
        log(result.line())
        log(f"wrote {run_dir / VERIFICATION_NAME} and {run_dir / REPORT_NAME}")
    else:
        log(f"the unlearned model is saved in {run_dir / 'model'}, but its verification {result.outcome.value}: "
            f"{result.error}. verification.json records this; `diffunlearn verify --model {run_dir} ...` "
            "measures it again")


def run_prompt_verify(cfg: VerifyConfig) -> dict:
    """``diffunlearn verify --prompt``: the prompt deletion from ``cfg.before`` to ``cfg.model`` (Stable Diffusion
    directories), judged by the memorisation rule of the ``prompt build`` folder ``cfg.data``. Every input is checked
    before anything is measured or written."""
    from ..runs import check_outside_model, prepare_out_dir
    from ..sd.detect import read_prompts
    from ..sd.memorisation import read_prompt_data
    from ..sd.pipeline import load_sd, pick_device, resolve_sd_dir
    from ..sd.proof import check_prompt_budget, check_prompt_length, prompt_summary_line, verify_prompt
    from ..sd.quality import quality_measure

    for name, what in (("model", "the unlearned Stable Diffusion directory"), ("before", "the model before the "
                       "deletion (a prompt is verified against it)"), ("data", "the folder of `prompt build` whose "
                       "rule says what is memorised"), ("out", "the directory to write")):
        if not getattr(cfg, name):
            raise UserError(f"pass --{name}: {what}")
    if cfg.budget == "off":  # options of image verification were refused by the command (commands/verify.py)
        raise UserError("--budget off verifies nothing: choose fast or full")
    if cfg.sample_steps < 1 or not cfg.guidance >= 0:
        raise UserError("--sample-steps must be >= 1 and --guidance >= 0")
    b = check_prompt_budget(cfg.budget, cfg.max_copy_rate)
    for model in (cfg.model, cfg.before):
        check_outside_model(cfg.out, str(resolve_sd_dir(model)))
    out = prepare_out_dir(cfg.out, cfg.overwrite)
    data = read_prompt_data(cfg.data)
    if data.rule is None:
        raise UserError(f"{cfg.data} holds no memorisation rule (memorisation.json): rebuild it with `diffunlearn "
                        "prompt build`")
    device = pick_device("auto")
    before = load_sd(cfg.before, cfg.allow_pickle).to(device)
    after = load_sd(cfg.model, cfg.allow_pickle).to(device)
    if tuple(after.image_shape) != tuple(before.image_shape):
        raise UserError(f"the model draws {tuple(after.image_shape)} images but the model before draws "
                        f"{tuple(before.image_shape)}: verify a model against the one it was unlearned from")
    before.check_images(tuple(data.rule.reference.shape), f"the memorised image of {cfg.data}")
    paraphrases = read_prompts(cfg.paraphrases) if cfg.paraphrases else []
    controls = read_prompts(cfg.control_prompts) if cfg.control_prompts else []
    for p in [cfg.prompt, *paraphrases, *controls]:
        check_prompt_length(before, p, "the prompt" if p == cfg.prompt else f"prompt {p!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = verify_prompt(before, after.unet, cfg.prompt, data.rule, budget=b, guidance=cfg.guidance,
                           sample_steps=cfg.sample_steps, seed=cfg.seed, paraphrases=paraphrases,
                           max_rate=cfg.max_copy_rate, log=say, controls=controls,
                           quality=quality_measure(cfg.clip, allow_pickle=cfg.allow_pickle) if controls else None)

    _write_verify_dir(out, cfg, result)
    say(prompt_summary_line(result))
    say(f"wrote {out / VERIFICATION_NAME} and {out / REPORT_NAME}")
    return result


def run_report(run_dir: str, out: str | None = None) -> int:
    path = write_report(run_dir, out)
    print(f"wrote {path}")
    return 0


#: the options of one kind of verification only: given for the other kind they are refused, not ignored
PROMPT_ONLY = ("paraphrases", "control_prompts", "clip", "guidance", "sample_steps")
IMAGE_ONLY = ("forget", "reference", "held_out", "audit", "audit_lr", "audit_batch_size", "sscd", "similarity_t",
              "samples")


def run_any_verify(cfg):
    """``verify``: a prompt deletion of a Stable Diffusion model with ``--prompt``, else a deletion of images."""
    default = VerifyConfig()
    given = [k for k in (IMAGE_ONLY if cfg.prompt else PROMPT_ONLY) if getattr(cfg, k) != getattr(default, k)]
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    if given and cfg.prompt:
        raise UserError(f"{flags} apply to image deletions, not to --prompt: drop them")
    if given:
        raise UserError(f"{flags} apply to prompt verification: pass --prompt, or drop them")
    if cfg.prompt:
        return run_prompt_verify(cfg)
    return run_verify(cfg)


def _verify_setup(p) -> None:
    config_command(p, VerifyConfig, run_any_verify)


def _report_setup(p) -> None:
    p.add_argument("dir", help="a run directory (unlearn or verify)")
    p.add_argument("--out", default=None, help="where to write the HTML (default: DIR/report.html)")
    p.set_defaults(func=lambda a: run_report(a.dir, a.out))


def register(commands: dict) -> None:
    """Add ``verify`` and ``report`` to the CLI's command table."""
    commands["verify"] = ("measure whether a deletion worked (before/after, reference images, verdicts); writes "
                          "verification.json and report.html", _verify_setup)
    commands["report"] = ("write report.html for a run directory from its files", _report_setup)
