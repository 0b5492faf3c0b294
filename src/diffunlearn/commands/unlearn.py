"""``diffunlearn unlearn``: validate everything, unlearn with the trainer, write the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..methods import MethodSpec
from ..sequential import SequentialConfig
from ..trainer import Checkpointer, TrainerConfig, accelerator, unlearn


@dataclass
class UnlearnConfig:
    """The ``unlearn`` command's settings by concern: run I/O here, then the ``method`` block, the ``trainer`` block
    and the ``sequential`` block (deletion requests)."""

    model: str = field(default="", metadata={"help": "diffusers model directory, a run directory holding model/, or a "
                                                     "shipped model's name"})
    data: str = field(default="", metadata={"help": "data SPEC for X: image folder, .npy/.npz, or a built-in name"})
    forget: str = field(default="default", metadata={"help": "forget SPEC for A: indices, names, @file, or 'default'"})
    out: str = field(default="", metadata={"help": "run directory to create"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output directory"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow loading pickle weights (.bin/.ckpt): only for "
                                                                "files you trust"})
    log_every: int = field(default=1, metadata={"help": "print a progress line every N steps (the JSONL log has "
                                                        "every step)"})
    cache_dir: str = field(default="", metadata={"help": "folder for cached latents of latent models and decompressed "
                                                         ".npz arrays (default: $DIFFUNLEARN_CACHE or "
                                                         "~/.cache/diffunlearn)"})
    method: MethodSpec = field(default_factory=MethodSpec)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sequential: SequentialConfig = field(default_factory=SequentialConfig)

    def validate(self) -> None:
        self.method.build()
        self.trainer.validate()
        self.sequential.validate()


#: settings that may differ when a run is resumed
RESUME_IGNORES = ("resume", "overwrite", "trainer.threads", "trainer.data_workers", "log_every", "cache_dir")


def run_unlearn(cfg: UnlearnConfig) -> dict:
    """The ``diffunlearn unlearn`` command: validate everything, then unlearn and write the run directory.

    Under ``accelerate launch`` every process runs this; only the main process writes. With ``--resume`` the run in
    ``--out`` continues from its last checkpoint (its settings must match) and ends with the same weights as an
    uninterrupted run.
    """
    from ..config import to_dict
    from ..cache import cache_dir, check_outside
    from ..data import load_data, resolve_forget, split_images
    from ..models import load_model, model_summary, save_model, state_hash
    from ..runs import RunDir, prepare_out_dir

    if cfg.sequential.requests:
        from ..sequential import run_sequential

        return run_sequential(cfg)
    cfg.validate()
    method, trainer = cfg.method.build(), cfg.trainer
    if not cfg.out:
        raise UserError("pass --out: the run directory to create")
    if not cfg.model:
        raise UserError("pass --model: a diffusers model directory")
    out = Path(cfg.out)
    if cfg.resume:
        _check_resumable(out, cfg)
    else:
        prepare_out_dir(out, cfg.overwrite)
    model = load_model(cfg.model, allow_pickle=cfg.allow_pickle)
    trainer.validate(model.num_train_timesteps)
    data = load_data(cfg.data, cfg.cache_dir or None)  # nothing decoded: files listed and checked, arrays mapped
    model.check_images(data.shape, "data")
    forget_idx = resolve_forget(cfg.forget, data)
    src = Path(model.source).resolve()
    if out.resolve() == src or src in out.resolve().parents or out.resolve() in src.parents:
        raise UserError("--out must not contain or be inside the input model's directory: the input is never modified")
    if model.codec is not None:
        check_outside(cache_dir(cfg.cache_dir or None), getattr(data.images, "root", None))
    # a latent model's images are encoded here, once, into the on-disk cache; the trainer sees only latents
    kept, forget = split_images(model.encode(data.images, "data", cfg.cache_dir or None), forget_idx)
    hash_before = state_hash(model.unet)
    acc = accelerator(trainer.mixed_precision)
    acc.wait_for_everyone()  # every process has validated before anything is written
    run = None
    checkpoint = Checkpointer(out / "checkpoint.pt")
    if acc.is_main_process:
        config = {"command": "unlearn", **to_dict(cfg)}
        run = RunDir(out, config, cfg.overwrite, resume_from=checkpoint.last_step() or 0 if cfg.resume else None)
    acc.wait_for_everyone()
    every = max(1, cfg.log_every)
    last: dict = {}

    def log(rec):
        last.clear()
        last.update(rec)
        run.log(rec)
        if rec["step"] % every == 0 or rec["step"] == trainer.steps:
            keys = [k for k in rec if k.startswith("loss_")] + ["grad_norm", "seconds"]
            print(f"step {rec['step']}/{trainer.steps} " + " ".join(f"{k}={rec[k]:.4g}" for k in keys if k in rec),
                  flush=True)

    new = unlearn(model, kept, forget, method, trainer, log=log, checkpoint=checkpoint)
    summary = {"command": "unlearn", "method": method.name, "hyperparameters": method.hyperparameters(),
               "steps": trainer.steps, "kept": len(kept), "forget": len(forget_idx),
               "forget_names": [data.names[i] for i in forget_idx][:50],
               "model_in": {"dir": model.source, "sha256": hash_before},
               "model_out": {"dir": str(out / "model"), "sha256": state_hash(new.unet)},
               "processes": acc.num_processes, "last_step": last, "model": model_summary(new)}
    if acc.is_main_process:
        save_model(new, run.model_dir)  # atomic: the model directory appears only when complete
        run.finish(summary)
        print(f"saved {run.model_dir}")
        checkpoint.path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    return summary


def _check_resumable(out: Path, cfg: UnlearnConfig) -> None:
    import yaml

    from ..config import flatten, to_dict

    if not (out / "config.yaml").is_file():
        raise UserError(f"nothing to resume in {out}: no config.yaml (start the run without --resume)")
    if (out / "summary.json").is_file():
        raise UserError(f"the run in {out} has already finished")
    old = flatten(yaml.safe_load((out / "config.yaml").read_text()) or {})
    defaults = flatten(to_dict(UnlearnConfig()))  # a run started before an option existed used its default
    new = flatten(to_dict(cfg))
    diff = [k for k, v in new.items() if k not in RESUME_IGNORES and old.get(k, defaults.get(k)) != v]
    if diff:
        raise UserError(f"--resume needs the same settings as the run in {out}; these differ: "
                        f"{', '.join(_flag(k) for k in diff)}")


def _flag(key: str) -> str:
    """The command-line flag of a dotted config key (``trainer.lr`` -> ``--lr``)."""
    from ..methods import flag_of

    if key == "method.name":
        return "--method"
    block, _, leaf = key.rpartition(".")
    return flag_of(leaf) if block == "method" else "--" + leaf.replace("_", "-")
