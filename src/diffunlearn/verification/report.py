"""``report.html``: one self-contained page (images as base64 PNG, no script, no external file or network) that says
what was removed, how, and whether it is gone, from the files of a run directory: ``verification.json``,
``config.yaml``, ``summary.json``, ``log.jsonl`` and ``ledger.jsonl`` (each used when present)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import yaml

from ..errors import UserError
from ..runs import read_json
from .results import Verification

REPORT_NAME = "report.html"
VERIFICATION_NAME = "verification.json"
STATUS_COLOURS = {"removed": "#1b7f3b", "removed (below reference)": "#4d8a1f", "not tested": "#6b6b6b",
                  "not measured": "#6b6b6b", "not resolved": "#6b6b6b", "kept": "#1b7f3b", "ok": "#1b7f3b",
                  "partly removed": "#b26b00", "no signal": "#6b6b6b", "not shown": "#6b6b6b", "no baseline": "#6b6b6b",
                  "inconclusive": "#6b6b6b", "not removed": "#b3261e", "degraded": "#b3261e", "failed": "#b3261e",
                  "interrupted": "#b3261e", "skipped": "#6b6b6b", "not verified": "#6b6b6b"}
ROLE_WORDS = {"before": "before", "after": "after", "retrained": "retrained"}
SPECS = {"similarity": ".3f", "loss": ".4g", "nll": ".2f", "nearest": ".2f", "generation": ".2f"}
CSS = """
body{font:15px/1.45 'DejaVu Sans',Arial,sans-serif;color:#1d1d1f;max-width:1120px;margin:24px auto;padding:0 20px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 14px}.banner{padding:12px 16px;border-radius:6px;color:#fff;margin:12px 0}
.banner b{font-size:18px;text-transform:uppercase;letter-spacing:.04em;margin-right:10px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13.5px}th,td{border:1px solid #d6d6d6;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12.5px;white-space:nowrap}
code,.hash{font-family:'DejaVu Sans Mono',monospace;font-size:12px}.hash{word-break:break-all}
img{image-rendering:pixelated;max-width:100%}.note{color:#444;font-size:13.5px}.fig{margin:8px 0 16px}
ul{margin:4px 0 8px 20px;padding:0}li{margin:2px 0}
ul.verdicts{list-style:none;margin:6px 0 10px;padding:0}ul.verdicts li{margin:6px 0;font-size:14px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _pill(status: str) -> str:
    return f'<span class="pill" style="background:{STATUS_COLOURS.get(status, "#6b6b6b")}">{_e(status)}</span>'


def _table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then the caller escaped them)."""
    cell = (lambda c: c) if raw else _e
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _img(pil, alt: str) -> str:
    from ..runs.images import data_uri

    return f'<div class="fig"><img alt="{_e(alt)}" src="{data_uri(pil)}"></div>'


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _read_optional(path: Path, kind: str):
    if not path.is_file():
        return None
    try:
        if kind == "json":
            return read_json(path)
        if kind == "yaml":
            return yaml.safe_load(path.read_text())
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]
    except (ValueError, yaml.YAMLError, OSError):
        return None


# ---------------------------------------------------------------- sections


def _removed(v: dict) -> str:
    from ..runs.images import decode_image, tiles

    f = v["forget"]
    rows = [[str(i["index"]), i["name"], i["sha256"]] for i in f["items"][:50]]
    more = f"<p class='note'>… and {len(f['items']) - 50} more (verification.json lists all).</p>" \
        if len(f["items"]) > 50 else ""
    pics = [decode_image(x) for x in v.get("images", {}).get("forget", [])]
    thumbs = _img(tiles(pics, v["images"].get("forget_names"), ncol=min(8, len(pics)), tile_side=112),
                  "the removed images") if pics else ""
    copies = f" ({f['distinct']} distinct images)" if f["distinct"] != f["count"] else ""
    return (f"<h2>What was removed</h2><p>{f['count']} image{'s' if f['count'] != 1 else ''}{copies}. Each is "
            "identified by the SHA-256 of its pixels (float32, model space), which is what the deletion ledger "
            f"records.</p>{thumbs}" + _table(["index", "name", "SHA-256 of the image"], rows) + more)


def _settings(config: dict | None, summary: dict | None, v: dict | None) -> str:
    rows = []
    if config:
        hp = config.get("method_hyperparameters") or {}
        rows.append(["command", str(config.get("command", "?"))])
        if config.get("method"):
            rows.append(["method", f"{config['method']} " + ", ".join(f"{k}={val}" for k, val in hp.items()
                                                                      if val is not None)])
        for k in ("model", "data", "forget", "steps", "lr", "batch_size", "grad_accum", "seed", "requests",
                  "before", "reference", "held_out", "budget", "audit"):
            if config.get(k) not in (None, ""):
                rows.append([k, str(config[k])])
    if summary:
        for k, label in (("model_in", "model in"), ("model_out", "model out")):
            if isinstance(summary.get(k), dict):
                rows.append([label, f"{summary[k].get('dir', '')} (state SHA-256 {summary[k].get('sha256', '')})"])
        if "wall_seconds" in summary:
            rows.append(["unlearning wall time", f"{summary['wall_seconds']:.1f} s"])
    shown = {(summary or {}).get(k, {}).get("sha256") for k in ("model_in", "model_out")
             if isinstance((summary or {}).get(k), dict)}
    if v and v.get("models"):
        for role, m in v["models"].items():
            if m["sha256"] in shown:
                continue
            rows.append([f"verified model: {role}", f"{m['source']} (state SHA-256 {m['sha256']})"])
    return "<h2>Method and settings</h2>" + (_table(["setting", "value"], rows) if rows else
                                             "<p class='note'>No config.yaml or summary.json here.</p>")


def _gen_cells(d: dict, roles: list[str]) -> list[str]:
    """The generation test's cells of the before/after table: near-copies per model."""
    t, f, r = d.get("targeted"), d["fresh"], d.get("retrained")
    a = {"before": f"{len(t['hits_before'])}/{t['seeds_searched']} searched" if t else "—",
         "after": (f"{len(t['still_after'])}/{len(t['hits_before'])} targeted, " if t else "")
         + f"{f['count']}/{f['n']} fresh",
         "retrained": f"{r['count']}/{r['n']} fresh" if r else "—"}
    return [_e(a[k]) for k in roles] + [""] * len(roles)


def _verdict_table(v: Verification) -> str:
    roles = [r for r in ("before", "after", "retrained") if r in v.record["models"]]
    head = ["measure"] + [f"A: {ROLE_WORDS[r]}" for r in roles] + [f"reference: {ROLE_WORDS[r]}" for r in roles] + \
        ["verdict"]
    rows, words = [], []
    for d in v.verdicts:
        spec, f = SPECS[d.measure], d.figures
        if d.measure == "generation":
            cells = [_e(d.label)] + _gen_cells(f, roles)
        else:
            cells = [_e(d.label)] + [f"<span class='num'>{_fmt(f['forget_mean'].get(r), spec)}</span>"
                                     for r in roles]
            cells += [f"<span class='num'>{_fmt(f['reference_mean'].get(r), spec)}</span>" for r in roles]
        rows.append(cells + [_pill(d.status.value)])
        words.append(f"<li>{_pill(d.status.value)} {_e(d.text)}</li>")
    loss = next((d.figures for d in v.verdicts if d.measure == "loss"), None)
    if loss and loss.get("auc"):
        rows.append(["membership AUC of A (by the loss; 0.5: like the reference)"]
                    + [f"<span class='num'>{_fmt(loss['auc'].get(r), '.2f')}</span>" for r in roles]
                    + [""] * len(roles) + [""])
    q_rows = [[_e(q.label)] + [_fmt(q.figures["mean"].get(r), SPECS[q.measure]) for r in roles]
              + [_pill(q.status.value)] for q in v.quality]
    q_words = "".join(f"<li>{_pill(q.status.value)} {_e(q.text)}</li>" for q in v.quality)
    ref = v.record["reference"]
    return ("<h2>Before and after</h2><p class='note'>Means over the items of A and over the reference images: "
            f"{ref['count']} {_e(ref['words'])}. Every verdict compares A with these reference images under the same "
            "model and says what its counts could detect (rules under <i>How this was measured</i>).</p>"
            + _table(head, rows, raw=True) + "<ul class='verdicts'>" + "".join(words) + "</ul>"
            + "<h2>Quality kept</h2><p class='note'>The same measures on the reference images: a damaged model cannot "
              "pass.</p>"
            + _table(["measure"] + [f"reference: {ROLE_WORDS[r]}" for r in roles] + ["verdict"], q_rows, raw=True)
            + "<ul class='verdicts'>" + q_words + "</ul>")


def _strips(v: dict) -> str:
    from ..runs.images import decode_image, stack, strip

    ims = v.get("images", {})
    originals = [decode_image(x) for x in ims.get("forget", [])]
    if not originals:
        return ""
    roles = [r for r in ("before", "after", "retrained") if r in ims.get("denoised", {})]
    sims = {r: v["measures"][r].get("similarity_a", []) for r in roles}
    near = ims.get("nearest_distance", {})
    t = next((d["label"] for d in v["verdicts"] if d["measure"] == "similarity"), "similarity")
    rows = []
    for k, orig in enumerate(originals):
        pics = [orig] + [decode_image(ims["denoised"][r][k]) for r in roles]
        labels = ["original"] + [f"{ROLE_WORDS[r]}: {sims[r][k]:.3f}" for r in roles]
        for r, pics_r in ims.get("nearest_sample", {}).items():
            if k < len(pics_r):
                pics.append(decode_image(pics_r[k]))
                labels.append(f"nearest fresh sample, {ROLE_WORDS[r]}: {near[r][k]:.2f}")
        name = (ims.get("forget_names") or [""] * len(originals))[k]
        rows.append(strip(pics, labels, title=f"{name}: original | noise-and-denoise | nearest fresh sample"))
    out = ("<h2>What each model does with the removed images</h2><p class='note'>Per image: the original, what "
           f"each model returns after noising it and denoising again (the number is the {_e(t)}), and the unlearned "
           "model's nearest fresh sample (the number is its distance).</p>" + _img(stack(rows, gap=10), "strips"))
    tg = ims.get("targeted")
    if tg and tg.get("seeds"):
        pics = [decode_image(x) for x in tg["before"]] + [decode_image(x) for x in tg["after"]]
        names = [f"seed {s} before: {d:.2f}" for s, d in zip(tg["seeds"], tg["distance_before"])] + \
            [f"seed {s} after: {d:.2f}" for s, d in zip(tg["seeds"], tg["distance_after"])]
        from ..runs.images import tiles

        out += ("<h2>Targeted seeds</h2><p class='note'>Seeds at which the model before drew a near-copy of A (top "
                "row) and what the unlearned model draws from the same seeds (bottom row); numbers: L2 distance to "
                "A. Seeds that still draw a near-copy come first.</p>"
                + _img(tiles(pics, names, ncol=len(tg["seeds"]), tile_side=112), "targeted seeds"))
    return out


def _curves(log: list[dict] | None) -> str:
    if not log:
        return ""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    keys = [k for k in log[0] if k.startswith("loss_")]
    norms = [k for k in ("grad_norm", "grad_norm_x", "grad_norm_a") if any(k in r for r in log)]
    if not keys and not norms:
        return ""
    x_of = [r.get("step", i + 1) if "request" not in r else i + 1 for i, r in enumerate(log)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, group, title in ((axes[0], keys, "loss terms"), (axes[1], norms, "gradient norms")):
        for k in group:
            ax.plot(x_of, [r.get(k, float("nan")) for r in log], label=k, lw=1.4)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("optimiser step" + (" (all requests)" if "request" in log[0] else ""))
        if group:
            ax.legend(fontsize=8)
        ax.grid(alpha=.3)
    if norms and any(r.get(k, 0) > 0 for r in log for k in norms):
        axes[1].set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return "<h2>Training curves</h2><p class='note'>From log.jsonl, one point per optimiser step.</p>" + \
        _img(Image.open(io.BytesIO(buf.getvalue())), "loss and gradient-norm curves")


def _until(until: dict | None) -> str:
    """The closed loop of ``unlearn --until removed``: each check's measures over the steps, where it stopped and
    why."""
    checks = (until or {}).get("checks") or []
    if not checks:
        return ""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    steps = [c["step"] for c in checks]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(steps, [c["targeted_still"] for c in checks], "o-", label="still draw A", lw=1.4)
    ax.plot(steps, [c.get("targeted_drawn", c["targeted_of"]) for c in checks], "x:", label="drawn again", lw=1)
    for c in checks:
        if "verification" in c:
            ax.annotate(c["verification"], (c["step"], c["targeted_still"]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=7)
    ax.set_title(f"targeted seeds ({until.get('targeted_seeds')} of {until.get('gate_seeds', '?')} searched)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    band = [c.get("loss_reference_band") for c in checks]
    if all(band):
        ax.fill_between(steps, [b[0] for b in band], [b[1] for b in band], alpha=.25,
                        label="reference images (5-95%)")
    ax.plot(steps, [c["loss_a"] for c in checks], "o-", label="A", lw=1.4)
    ax.plot(steps, [c["loss_reference"] for c in checks], "-", label="reference mean", lw=1)
    ax.set_title("denoising loss", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    worse = [c.get("quality_worse_by") for c in checks]
    if all(w is not None for w in worse):
        err = [2 * (c.get("quality_stderr") or 0) for c in checks]
        ax.errorbar(steps, worse, yerr=err, fmt="o-", lw=1.4, label="worse by (+- 2 s.e.)")
        ax.plot(steps, [c.get("quality_limit") for c in checks], "r--", lw=1, label="degraded above")
        ax.legend(fontsize=8)
    ax.set_title("quality: reference images' loss vs before", fontsize=10)
    stop = until.get("stopped_at")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=.3)
        if stop:
            ax.axvline(stop, color="k", lw=.8, ls=":")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    why = {"removed": f"stopped at step {stop}: the {until.get('budget')} verification confirmed the removal",
           "not removed": f"not removed within the step budget ({len(checks)} checks)",
           "stopped by the quality guard": f"stopped at step {stop} by the quality guard; the saved model is step "
                                           f"{until.get('model_is_step')}'s, whose quality held"}
    rows = [[str(c["step"]), f"{c['targeted_still']} / {c.get('targeted_drawn', c['targeted_of'])}",
             _fmt(c["loss_a"], ".4g"), _fmt(c["loss_reference"], ".4g"), c["quality"],
             c.get("verification", ""), _fmt(c.get("seconds"), ".1f")] for c in checks]
    return (f"<h2>Unlearning until removed</h2><p class='note'>A check every {until.get('check_every')} steps: "
            f"<b>{_e(why.get(until.get('outcome'), until.get('outcome')))}</b>. Each check draws the targeted seeds "
            "again (the budget's first; the rest only when those are clean) and measures the denoising loss of A "
            "and of the reference images; only a check with no targeted seed drawing A is confirmed by the "
            "verification.</p>"
            + _img(Image.open(io.BytesIO(buf.getvalue())), "checks of the closed loop")
            + _table(["step", "targeted still / drawn", "loss A", "loss reference", "quality", "verification",
                      "seconds"], rows))


def _audit(a: dict | None) -> str:
    if not a:
        return ""
    keys = ("similarity", "loss", "membership_auc")
    spec = {"similarity": ".3f", "loss": ".4g", "membership_auc": ".2f"}
    rows = []
    for r in a["rows"]:
        rec = r.get("recovered") or {}
        rows.append([r["model"], f"{r['attack']} ({r['images']} images)"]
                    + [f"{r['start'][k]:{spec[k]}} → {r['attacked'][k]:{spec[k]}}" for k in keys]
                    + ["—" if rec.get(k) is None else f"{100 * rec[k]:.0f}%" for k in keys])
    s, b = a["settings"], a.get("before")
    before = (f" Under the model before, A scored: similarity {b['similarity']:.3f}, loss {b['loss']:.4g}, "
              f"membership AUC {b['membership_auc']:.2f}." if b else "")
    return ("<h2>Relearning audit</h2>"
            f"<p class='note'>{_e(a['definition'])}. {s['steps']} steps, lr {s['lr']:g}, batch {s['batch_size']}, "
            f"seed {s['seed']}; {a['seconds']:.0f} s.{_e(before)}</p>"
            + _table(["model", "fine-tuned on", "A similarity", "A loss", "membership AUC", "recovered: similarity",
                      "recovered: loss", "recovered: AUC"], rows) + f"<p>{_e(a['text'])}</p>")


def _ledger(entries: list[dict] | None) -> str:
    if not entries:
        return ""
    rows = []
    for e in entries:
        b, a = e.get("metrics_before", {}), e.get("metrics_after", {})
        def pair(k, b=b, a=a):
            ok = isinstance(b.get(k), (int, float)) and isinstance(a.get(k), (int, float))
            return f"{b[k]:.3f} → {a[k]:.3f}" if ok else "—"
        names = [r.get("name", "?") for r in e.get("removed", [])]
        rows.append([str(e.get("request")), e.get("time", ""), str(e.get("count", len(names))),
                     ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else ""), e.get("method", ""),
                     pair("similarity_mean"), pair("membership_auc"),
                     f"{str(e.get('model_before', ''))[:12]} → {str(e.get('model_after', ''))[:12]}"])
    return ("<h2>Deletion ledger</h2><p class='note'>ledger.jsonl: one hash-chained line per request "
            "(<code>diffunlearn ledger DIR</code> verifies the chain).</p>"
            + _table(["#", "time (UTC)", "removed", "names", "method", "similarity", "membership AUC",
                      "model before → after"], rows))


def _prompt_parts(v: dict) -> str:
    """A prompt deletion's verdicts, and its samples before and after at the seeds that drew the image before."""
    from ..runs.images import decode_image, tiles

    rows = []
    for d in v["verdicts"]:
        what = d["measure"] + (f": {_e(d['prompt'])} (guidance {d['guidance']:g})" if "prompt" in d else "")
        rows.append([_e(what), _pill(d["status"]), _e(d["text"])])
    det = v.get("detect") or {}
    out = [f"<h2>The prompt</h2><p><code>{_e(v['prompt'])}</code>, guidance {v['guidance']:g}, "
           f"{v['sample_steps']} DDIM steps; a sample is {_e(v['memorisation']['rule'])} "
           f"(threshold {v['memorisation']['threshold']:g}).</p>",
           "<h2>Verdicts</h2>" + _table(["measure", "verdict", "counts"], rows, raw=True)]
    if det:
        out.append(f"<p class='note'>Detection score ({det['seeds']} starting noises): {_e(det['text'])}.</p>")
    out.append(f"<p class='note'>Quality: {_e(v['quality']['text'])}.</p>")
    t = v["images"]["targeted"]
    if t["seeds"]:
        pics = [decode_image(x) for x in t["before"]] + [decode_image(x) for x in t["after"]]
        labels = [f"seed {s} before" for s in t["seeds"]] + [f"seed {s} after" for s in t["seeds"]]
        out.append("<h2>Targeted seeds: before (top) and after (bottom)</h2>"
                   + _img(tiles(pics, labels, ncol=len(t["seeds"]), tile_side=128), "samples before and after"))
    else:
        out.append("<p class='note'>The model before drew the image at none of the searched seeds: no samples to "
                   "show before and after.</p>")
    b = v["budget"]
    out.append(f"<p class='note'>Budget <b>{_e(b['name'])}</b>: {b['fresh']} fresh samples, {b['search_seeds']} "
               f"searched seeds, {b['per_variant']} samples per reworded prompt and guidance scale.</p>")
    return "".join(out)


def _method_notes(v: dict) -> str:
    from .verdicts import MIN_REFERENCE, NEAR_COPY_FRACTION, QUALITY_SPREAD, TAIL_HIGH, TAIL_LOW

    d = v["definitions"]
    b = v["budget"]
    items = "".join(f"<li><b>{_e(k)}</b>: {_e(t)}</li>" for k, t in d.items())
    secs = "; ".join(f"{r} " + ", ".join(f"{k} {s:.1f} s" for k, s in v["measures"][r]["seconds"].items())
                     for r in v["measures"])
    return ("<h2>How this was measured</h2><ul>" + items + "</ul>"
            f"<p class='note'>Budget <b>{_e(b['name'])}</b>: {_e(b.get('resolves', ''))}. Verdicts: an item of A "
            f"<i>stands out</i> when it looks more memorised than {TAIL_HIGH:.0%} of the reference images under the "
            f"same model (rank above {TAIL_HIGH:g}), <i>falls below</i> under {TAIL_LOW:g}; with fewer than "
            f"{MIN_REFERENCE} reference images that tail cannot be told from chance and the measure is <i>not "
            "tested</i>. A measure on which A did not stand out under the model before shows <i>no signal</i> and "
            f"never counts as removal. A near-copy is a sample nearer to an item of A than {NEAR_COPY_FRACTION:g} "
            "times the distance from that item to its nearest other real image. The deletion is <i>removed</i> only "
            "when every measure that showed A is resolved and none still shows it. Quality is <i>degraded</i> when the "
            f"reference images' mean moved the wrong way by more than {QUALITY_SPREAD:g} x their spread under the "
            "baseline model, <i>kept</i> when its worsening plus two standard errors stays within that. Seconds: "
            f"{_e(secs)}; total {v.get('seconds', 0):.1f} s.</p>")


def render(run_dir: str | Path) -> str:
    """The report of ``run_dir`` as an HTML string (from whichever of its files exist)."""
    root = Path(run_dir)
    v = _read_optional(root / VERIFICATION_NAME, "json")
    config = _read_optional(root / "config.yaml", "yaml")
    summary = _read_optional(root / "summary.json", "json")
    log = _read_optional(root / "log.jsonl", "jsonl")
    ledger = _read_optional(root / "ledger.jsonl", "jsonl")
    if v is None and config is None and summary is None:
        raise UserError(f"{root} holds no verification.json, config.yaml or summary.json: pass a run directory "
                        "written by `diffunlearn unlearn` or `diffunlearn verify`")
    status = (v or {}).get("status", "not verified")
    # a finished verification of images, typed; a prompt deletion's proof has a format of its own
    typed = Verification.from_dict(v) if status == "ok" and v.get("kind") != "prompt" else None
    if typed is not None:
        status, text = typed.overall.status.value, typed.overall.text
    elif status == "ok":
        status, text = v["overall"]["status"], v["overall"]["text"]
    elif v is None:
        text = ("This run has no verification.json: run `diffunlearn verify --model "
                f"{root} --data ... --forget ... --before ... --out DIR` to verify it.")
    else:
        text = (f"Verification did not finish ({v.get('error')}). The unlearned model is saved; run `diffunlearn "
                "verify` on it to measure what is missing.")
    method = (config or {}).get("method") or (summary or {}).get("method") or ""
    method = method.get("name", "") if isinstance(method, dict) else method
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Deletion report: {_e(root.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Deletion report</h1><p class='sub'>{_e(root.resolve())}"
             f"{' · method ' + _e(method) if method else ''}"
             f"{' · verified ' + _e(v['time']) if v and 'time' in v else ''}"
             "</p>",
             f"<div class='banner' style='background:{STATUS_COLOURS.get(status, '#6b6b6b')}'><b>{_e(status)}</b>"
             f"{_e(text)}</div>"]
    if v and v.get("status") == "ok" and v.get("kind") == "prompt":
        parts += [_settings(config, summary, None), _prompt_parts(v)]
    elif typed is not None:
        parts += [_removed(v), _settings(config, summary, v), _verdict_table(typed), _strips(v), _audit(typed.audit)]
    else:
        parts.append(_settings(config, summary, v))
    parts += [_until((summary or {}).get("until")), _curves(log), _ledger(ledger)]
    if typed is not None:
        parts.append(_method_notes(v))
    parts.append("<p class='note'>Written by diffunlearn; this page loads nothing from the network.</p></body></html>")
    return "\n".join(p for p in parts if p)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for ``run_dir``, atomically."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"run directory not found: {root}")
    text = render(root)
    path = Path(out) if out else root / REPORT_NAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
