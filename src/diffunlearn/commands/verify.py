"""``diffunlearn verify`` (is it gone? before/after evidence for any models) and ``diffunlearn report`` (a run's
report.html from its files)."""

from __future__ import annotations


def run_report(run_dir: str, out: str | None = None) -> int:
    from ..verification.report import write_report

    path = write_report(run_dir, out)
    print(f"wrote {path}")
    return 0


def run_any_verify(cfg):
    """``verify``: a prompt deletion of a Stable Diffusion model with ``--prompt``, else a deletion of images."""
    from ..errors import UserError
    from ..verification.command import VerifyConfig, run_verify

    if cfg.prompt:
        from ..sd.proof import run_prompt_verify

        return run_prompt_verify(cfg)
    default = VerifyConfig()
    for name in ("paraphrases", "control_prompts", "clip", "guidance", "sample_steps"):
        if getattr(cfg, name) != getattr(default, name):
            raise UserError(f"--{name.replace('_', '-')} applies to prompt verification: pass --prompt, or drop it")
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
