"""``diffunlearn verify`` (is it gone? before/after evidence for any models) and ``diffunlearn report`` (a run's
report.html from its files)."""

from __future__ import annotations


def run_report(run_dir: str, out: str | None = None) -> int:
    from ..verification.report import write_report

    path = write_report(run_dir, out)
    print(f"wrote {path}")
    return 0


#: the options of one kind of verification only: given for the other kind they are refused, not ignored
PROMPT_ONLY = ("paraphrases", "control_prompts", "clip", "guidance", "sample_steps")
IMAGE_ONLY = ("forget", "reference", "held_out", "audit", "audit_lr", "audit_batch_size", "sscd", "similarity_t",
              "samples")


def run_any_verify(cfg):
    """``verify``: a prompt deletion of a Stable Diffusion model with ``--prompt``, else a deletion of images."""
    from ..errors import UserError
    from ..verification.command import VerifyConfig, run_verify

    default = VerifyConfig()
    given = [k for k in (IMAGE_ONLY if cfg.prompt else PROMPT_ONLY) if getattr(cfg, k) != getattr(default, k)]
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    if given and cfg.prompt:
        raise UserError(f"{flags} apply to image deletions, not to --prompt: drop them")
    if given:
        raise UserError(f"{flags} apply to prompt verification: pass --prompt, or drop them")
    if cfg.prompt:
        from ..sd.proof import run_prompt_verify

        return run_prompt_verify(cfg)
    return run_verify(cfg)


def _verify_setup(p) -> None:
    from ..config import config_command
    from ..verification.command import VerifyConfig

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
