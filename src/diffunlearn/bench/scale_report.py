"""The markdown report of ``diffunlearn bench scale`` (``scale.md``): the machine, the parameter counts against the
published ones, one table row per command and each row's exact command line."""

from __future__ import annotations

from pathlib import Path

GB = 2**30


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _duration(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def table(summary: dict) -> str:
    util = summary["config"]["utilisation"]
    lines = ["| row | status | first unit after (s) | s / unit | unit | peak RSS (GiB) | estimate (GiB) | TFLOP / unit "
             f"| CPU GFLOP/s | A100 @{util:.0%} (projection) | H100 @{util:.0%} (projection) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["rows"].items():
        proj = r.get("projection_seconds") or {}
        flops = r.get("flops_per_unit")
        per = _num(r.get("seconds_per_unit"), ".1f") + ("*" if r.get("timing_includes_flop_counter") else "")
        lines.append(
            f"| {name} | {r['status']} | {_num(r.get('first_unit_seconds'), '.1f')} | {per} | "
            f"{r.get('unit', '—')} | {_num(r['peak_rss_bytes'] / GB if r.get('peak_rss_bytes') else None, '.2f')} | "
            f"{r['estimate_bytes'] / GB:.1f} | {_num(flops / 1e12 if flops else None, '.3f')} | "
            f"{_num(r['cpu_flops_per_second'] / 1e9 if r.get('cpu_flops_per_second') else None, '.1f')} | "
            f"{_duration(proj.get('A100'))} | {_duration(proj.get('H100'))} |")
    return "\n".join(lines)


def write_report(path: Path, summary: dict, log_lines: list[str]) -> str:
    cfg, m = summary["config"], summary["machine"]
    params = ["| component | built from the config | published |", "|---|---|---|"]
    for name, c in summary["parameters"].items():
        pub = "—" if c["published"] is None else f"{c['published']:,}"
        params.append(f"| {name} | {c['parameters']:,} | {pub} |")
    setup = []
    for what, s in summary["setup"].items():
        if s.get("reused") and "seconds" not in s:
            setup.append(f"- {what}: {s['dir']} (reused from the cache)")
        else:
            extra = f", peak RSS {s['peak_rss_bytes'] / GB:.2f} GiB" if s.get("peak_rss_bytes") else ""
            again = " (reused since)" if s.get("reused") else ""
            setup.append(f"- {what}: {s['dir']}: {s.get('seconds')} s, {s.get('bytes_on_disk', 0) / GB:.2f} GiB on disk"
                         f"{extra}{again}")
    util = cfg["utilisation"]
    commands = [f"- **{name}** ({r.get('note', '')}): `{r['command']}`" for name, r in summary["rows"].items()]
    text = "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, torch {m['torch']}; "
        f"{cfg['threads']} thread(s) per command{' (--quick: tiny models, in-process)' if cfg['quick'] else ''}. "
        f"Total {summary['seconds']:.0f} s.",
        "", "Parameter counts (built on the meta device from the configs in `bench/published.json`):", "",
        *params, "", "Setup:", "", *setup, "",
        "Rows (each a real `diffunlearn` command in a fresh process; unit = optimiser step or UNet forward):", "",
        table(summary), "",
        "- *first unit after*: wall time from launching the command to the end of its first optimiser step (or UNet "
        "forward), imports, loading and any evaluation before it included.",
        "- *s / unit*: median over the units after the first, leaving out the second (FLOP-counted) one when others "
        "remain; `*` marks a figure that only the counted unit gave (FlopCounterMode adds a little time).",
        "- *peak RSS*: the command's process, `ru_maxrss` from `wait4`. *estimate*: the formula the benchmark checks "
        "against `MemAvailable` before a row (weights, gradient buffers, optimiser state, frozen parts, a 2 GiB "
        "activation allowance).",
        f"- *TFLOP / unit*: `torch.utils.flop_counter.FlopCounterMode` over the second unit of the real command. "
        f"*A100 / H100*: that count divided by {util:.0%} of the bf16 dense peak (312 and 989 TFLOP/s): a "
        "projection by arithmetic, not a measurement, and it assumes the step runs in bf16.",
        "", "Commands:", "", *commands, "", "Log:", "", "```", *log_lines, "```", ""])
    Path(path).write_text(text)
    return table(summary)
