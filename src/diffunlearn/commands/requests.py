"""Sequential deletion requests: ``diffunlearn unlearn --requests FILE``.

Request ``k`` removes its set ``A_k`` from the model that request ``k - 1`` produced, with the same method settings
for ``--steps`` steps, keeping ``X \\ (A_1 u ... u A_k)``: what earlier requests removed is never trained on again.
After each request the run measures, with the model before and after it:

- the noise-and-denoise similarity (:mod:`diffunlearn.metrics.similarity`) of this request's images, and after it
  of every image forgotten so far;
- a quality measure, named in each record: the mean denoising loss (membership draws, lower is better) of held-out
  images (``--held-out`` or the data set's own), else of up to 256 images that no request removes;
- with held-out images, the membership-inference AUC of this request's images (and of all forgotten so far) against
  them (:mod:`diffunlearn.metrics.membership`).

After each request the model is saved (atomically) to ``<out>/model`` with the ledger so far inside it, then the
request's line is appended to ``<out>/ledger.jsonl`` (:mod:`diffunlearn.runs.ledger`). So every ledger line describes a
model that was saved, and the model directory always carries the ledger of exactly its own history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from ..config import to_dict
from ..console import logger
from ..data import ImageSet, content_hash, load_data, resolve_forget
from ..data.labels import class_counts, labels_for_model
from ..errors import UserError
from ..metrics.membership import denoising_losses, loss_auc
from ..metrics.similarity import SIMILARITY_T, load_similarity, noise_and_denoise_similarity
from ..model import DiffusionModel, load_model, model_summary, save_model, state_hash
from ..model.sampling import save_grid
from ..runs import RunDir, check_space, prepare_out_dir
from ..runs.ledger import LEDGER_NAME, Ledger, line_hash, read_ledger, verify_ledger
from ..runs.summary import RequestsSummary
from ..trainer import Checkpointer, TrainerConfig, accelerator
from ..verification.loop import UntilRemoved, fresh_blocks_after
from .deletion import keep_trained, load_inputs, space_for, train_request

say = logger(__name__).info

QUALITY_IMAGES = 256
STRIP_IMAGES = 64
SETTINGS = ("steps", "lr", "batch_size", "grad_accum", "beta1", "beta2", "weight_decay", "clip_norm", "t_min", "t_max",
            "seed", "mixed_precision")


@dataclass
class SequentialConfig:
    """Sequential deletion requests: applied in turn, each for the trainer's steps, with a ledger."""
    requests: str = field(default="", metadata={"help": "file of deletion requests applied in turn, each for --steps "
                                                        "steps, or with --until removed until its own loop confirms "
                                                        "it (one forget SPEC per line, or a YAML list); writes "
                                                        "ledger.jsonl"})
    held_out: str = field(default="", metadata={"help": "with --requests: data SPEC of images never trained on "
                                                        "(membership AUC, quality loss); default: the data set's own"})
    sscd: str = field(default="", metadata={"help": "with --requests: local SSCD TorchScript file for the "
                                                    "noise-and-denoise similarity (default: weight-free pixel cosine)"})
    similarity_t: int = field(default=SIMILARITY_T, metadata={"help": "with --requests: noise-and-denoise "
                                                                      "similarity noises to this step, denoises back"})

    def validate(self) -> None:
        if not self.requests and (self.held_out or self.sscd or self.similarity_t != SIMILARITY_T):
            raise UserError("--held-out, --sscd and --similarity-t apply only with --requests")


def read_requests(path: str) -> list[str]:
    """Forget SPECs from a text file (one per line; blank lines and ``#`` comments skipped) or a YAML file (a list, or
    a mapping with ``requests:``; an entry is a SPEC string, an index, or a list of indices and names)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"requests file not found: {p}")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"cannot parse {p}: {str(e).splitlines()[0]}") from None
        if isinstance(obj, dict) and set(obj) == {"requests"}:
            obj = obj["requests"]
        if not isinstance(obj, list):
            raise UserError(f"{p} must hold a list of requests (or a mapping with only 'requests:')")
        specs = []
        for i, item in enumerate(obj, 1):
            if isinstance(item, list) and item and all(isinstance(x, (str, int)) for x in item):
                item = ",".join(str(x) for x in item)
            if not isinstance(item, (str, int)) or isinstance(item, bool):
                raise UserError(f"{p}: request {i} must be a forget SPEC, an index or a list of them, got {item!r}")
            specs.append(str(item))
    else:
        specs = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not specs:
        raise UserError(f"{p} lists no deletion requests")
    return specs


def resolve_requests(specs: list[str], data: ImageSet) -> list[list[int]]:
    """Indices of each request's images; requests must be disjoint and leave something to keep."""
    done: dict[int, int] = {}
    out = []
    for k, spec in enumerate(specs, 1):
        try:
            idx = resolve_forget(spec, data)
        except UserError as e:
            raise UserError(f"request {k}: {e}") from None
        again = [i for i in idx if i in done]
        if again:
            raise UserError(f"request {k} names {data.names[again[0]]}, already removed by request {done[again[0]]}")
        done.update((i, k) for i in idx)
        out.append(idx)
    if len(done) >= len(data):
        raise UserError("the requests together remove the whole data set: nothing would be left to keep")
    return out


@dataclass
class Measurement:
    """One model's metrics on a stack of forgotten images (request order) and on the quality reference."""
    similarity: str
    scores: torch.Tensor
    denoised: torch.Tensor
    losses: torch.Tensor
    reference_losses: torch.Tensor


class Evaluator:
    """Measures models on the forgotten images and a fixed reference set, with fixed noise throughout."""

    def __init__(self, cfg: SequentialConfig, trainer: TrainerConfig, reference: torch.Tensor, held_out: bool,
                 reference_labels: torch.Tensor | None = None):
        self.cfg, self.reference, self.held_out = cfg, reference, held_out
        self.reference_labels = reference_labels
        self.seed, self.batch_size = trainer.seed, trainer.batch_size
        self.backend = load_similarity(cfg.sscd or None)
        self.quality_measure = "denoising-loss/" + ("held-out" if held_out else "kept")

    def measure(self, model: DiffusionModel, images: torch.Tensor, labels: torch.Tensor | None = None
                ) -> Measurement:
        """``images`` (and the reference) under ``model``: each under its own class for a class-conditional model
        (``labels``; the reference's are ``self.reference_labels``), a latent model's loss on their latents."""
        sim = noise_and_denoise_similarity(model, images, self.backend, self.cfg.similarity_t, self.seed,
                                           self.batch_size, labels=labels)
        losses = denoising_losses(model, model.encode(images), seed=self.seed, batch_size=self.batch_size,
                                  labels=labels)
        ref = denoising_losses(model, model.encode(self.reference), seed=self.seed, batch_size=self.batch_size,
                               labels=self.reference_labels)
        return Measurement(sim.similarity, sim.scores, sim.denoised, losses, ref)

    def metrics(self, m: Measurement, sel: slice) -> dict:
        """The record of the images ``sel`` of the stack ``m`` was measured on."""
        scores = m.scores[sel]
        out = {"similarity": m.similarity, "similarity_t": self.cfg.similarity_t,
               "similarity_mean": float(scores.mean()), "similarity_per_image": [round(float(s), 6) for s in scores],
               "quality_measure": self.quality_measure, "quality": float(m.reference_losses.mean())}
        if self.held_out:
            out["membership_auc"] = loss_auc(m.losses[sel], m.reference_losses)
        return out


def _reference(held_out, seed: int, data: ImageSet, removed: set[int], classes: list[str] | None = None
               ) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """Held-out images (``--held-out``'s, given as ``held_out``, else the data set's own), else images no request
    removes; at most 256, chosen before any is decoded. For a class-conditional model (``classes``: its class
    names) also their labels as its class indices: the data set's own held-out images with their labels, else kept
    images (``--held-out`` images carry no labels)."""
    labels = None
    if classes is not None:
        if held_out is not None:
            raise UserError("--held-out images carry no class labels, which a class-conditional model needs: drop "
                            "--held-out (the data set's own held-out images, or kept images, are used)")
        if data.held_out is not None and data.held_out_labels is not None:
            images, labels = data.held_out, labels_for_model(data, classes, held_out=True)
        else:
            keep = [i for i in range(len(data)) if i not in removed]
            images, labels = data.images.subset(keep), labels_for_model(data, classes)[keep]
        held = data.held_out is not None and data.held_out_labels is not None
    else:
        if held_out is not None:
            images = held_out
        elif data.held_out is not None:
            images = data.held_out
        else:
            images = data.images.subset([i for i in range(len(data)) if i not in removed])
        held = held_out is not None or data.held_out is not None
    if len(images) > QUALITY_IMAGES:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(images), generator=g)[:QUALITY_IMAGES].sort().values
        return images[pick], held, None if labels is None else labels[pick]
    return images[:], held, labels


def _check(cfg) -> None:
    if cfg.forget != "default":
        raise UserError("--forget does not apply with --requests: list the items to forget in the requests file")
    if not cfg.out:
        raise UserError("pass --out: the run directory to create")
    if not cfg.model:
        raise UserError("pass --model: a diffusers model directory")


class RequestState:
    """What a request's checkpoint keeps beside the training state: which request it is (its number, the content
    hashes of its images, the state hash of the model it started from), so that ``--resume`` never continues another
    request's training, and the state of its closed loop (``--until removed``), if any."""

    def __init__(self, k: int, removed: list[str], model_before: str, loop: UntilRemoved | None = None):
        self.k, self.removed, self.model_before, self.loop = k, removed, model_before, loop

    def tag(self) -> dict:
        return {"request": self.k, "removed": self.removed, "model_before": self.model_before}

    def state_dict(self) -> dict:
        return {**self.tag(), **({"loop": self.loop.state_dict()} if self.loop is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if self.loop is not None and "loop" in state:
            self.loop.load_state_dict(state["loop"])


def checkpoint_of(out: Path, k: int) -> Path:
    """Where request ``k``'s training state is checkpointed (removed once its model and ledger line are saved)."""
    return out / f"checkpoint-request-{k}.pt"


def _without(data: ImageSet, gone: set[int], idx: list[int]) -> tuple[ImageSet, list[int]]:
    """``data`` without the images of earlier requests (they are no longer kept, so they are neither reference
    images nor the other images that set A's near-copy distance), and ``idx`` as positions in it."""
    if not gone:
        return data, list(idx)
    keep = [i for i in range(len(data)) if i not in gone]
    where = {i: j for j, i in enumerate(keep)}
    view = ImageSet(data.images.subset(keep), [data.names[i] for i in keep], held_out=data.held_out,
                    source=data.source, meta=data.meta,
                    labels=None if data.labels is None else data.labels[keep], classes=data.classes,
                    held_out_labels=data.held_out_labels)
    return view, [where[i] for i in idx]


def _record_of(entry: dict) -> dict:
    """A request's line of ``summary.json`` from its ledger entry."""
    before, after = entry["metrics_before"], entry["metrics_after"]
    return {"request": entry["request"], "count": entry["count"], "similarity_before": before["similarity_mean"],
            "similarity_after": after["similarity_mean"], "quality_before": before["quality"],
            "quality_after": after["quality"], "membership_auc_before": before.get("membership_auc"),
            "membership_auc_after": after.get("membership_auc"), "seconds": entry["seconds"],
            **({"until": {k: entry["until"][k] for k in ("outcome", "exit_status", "stopped_at", "model_is_step")}}
               if "until" in entry else {})}


def _resumed(out: Path, base: DiffusionModel, hashes: list[list[str]]) -> tuple[int, DiffusionModel]:
    """How many requests the run in ``out`` finished, and the model they left. A run killed between saving a
    request's model and appending its ledger line is completed from the copy of the ledger inside the model.
    ``hashes``: the content hashes of each request's images, which the finished requests must have removed."""
    path = out / LEDGER_NAME
    if path.is_file() and read_ledger(path).torn:  # a kill inside the append: the model's copy holds the line
        whole = read_ledger(path).lines
        path.write_bytes(b"".join(line + b"\n" for line in whole))
    lines = path.read_bytes().splitlines() if path.is_file() else []
    if not (out / "model").is_dir():
        if lines:
            raise UserError(f"{out} has ledger lines but no model/: start again with --overwrite")
        return 0, base
    model = load_model(out / "model")
    inside = (out / "model" / LEDGER_NAME).read_bytes().splitlines()
    if inside[:len(lines)] != lines or len(inside) > len(lines) + 1:
        raise UserError(f"the ledger of {out} and the one inside its model disagree: start again with --overwrite")
    if len(inside) == len(lines) + 1:  # killed after the model was saved, before its line was appended
        Ledger(path).append(inside[-1])
    read = read_ledger(path)
    verify_ledger(read, state_hash(model.unet))
    for e, removed in zip(read.entries, hashes):
        if [r["sha256"] for r in e["removed"]] != removed:
            raise UserError(f"request {e['request']} of the run in {out} removed other images than the requests "
                            "file names now: resume with the same requests, or start again with --overwrite")
    return len(read.entries), model


def run_sequential(cfg) -> RequestsSummary | None:
    """Apply the deletion requests of ``cfg.sequential.requests`` in turn; write the run directory and its ledger.
    ``cfg`` holds the run's I/O (model, data, out, ...), its ``method`` block, ``trainer`` and ``sequential``.

    Each request is trained by :func:`~diffunlearn.commands.deletion.train_request`, the path of a single request:
    under ``accelerate launch`` every process trains it and the main process measures and writes; with
    ``--checkpoint-every`` (or the default of one checkpoint every 10 minutes) a request killed part-way continues
    from its last checkpoint on ``--resume``, and ends with the weights of a run that was never killed."""
    _check(cfg)
    seq, trainer = cfg.sequential, cfg.trainer
    cfg.method.build(allow_auto=True)  # an 'auto' setting is measured at each request's model
    trainer.validate()
    specs = read_requests(seq.requests)
    out = Path(cfg.out)
    acc = accelerator(trainer.mixed_precision)
    main = acc.is_main_process
    if not cfg.resume and main:
        prepare_out_dir(out, cfg.overwrite)
    model, data = load_inputs(cfg, out)
    base = model
    if not 0 <= seq.similarity_t <= model.num_train_timesteps:
        raise UserError(f"--similarity-t must lie in [0, {model.num_train_timesteps}], got {seq.similarity_t}")
    held_out = load_data(seq.held_out, cfg.cache_dir or None).images if seq.held_out else None
    if held_out is not None:
        model.check_images(tuple(held_out.shape[1:]), "held-out")
    requests = resolve_requests(specs, data)
    hashes = [[content_hash(data.images[i]) for i in idx] for idx in requests]  # each image of A decoded once
    order = [i for idx in requests for i in idx]
    reference, held, reference_labels = _reference(held_out, trainer.seed, data, set(order),
                                                   model.classes if model.conditional else None)
    # loads SSCD: a bad file fails before anything is written
    evaluator = Evaluator(seq, trainer, reference, held, reference_labels)
    labels = labels_for_model(data, model.classes) if model.conditional else None  # as the model's class indices
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    stack = data.images[order]
    stack_labels = None if labels is None else labels[order]
    ends = [sum(len(r) for r in requests[:k + 1]) for k in range(len(requests))]
    # a latent model trains on latents, encoded once into the cache; a pixel model on the images themselves
    encoded = model.encode(data.images, "data", cfg.cache_dir or None)
    check_space(out, space_for(model, trainer, bool(cfg.until), replaces_model=len(requests) > 1 or cfg.resume))

    config = {"command": "unlearn", **to_dict(cfg), "requests_list": specs}
    acc.wait_for_everyone()  # every process has validated before anything is written
    done, model = _resumed(out, model, hashes) if cfg.resume and main else (0, model)
    acc.wait_for_everyone()
    if cfg.resume and not main:  # the main process has completed a torn ledger: read what it left
        done, model = _resumed(out, model, hashes)
    if done == len(requests):
        raise UserError(f"every request of {seq.requests} is already done in {out}: nothing to resume")
    for k in range(1, done + 1):  # a kill after a request's model and line were saved leaves its checkpoint
        if main:
            checkpoint_of(out, k).unlink(missing_ok=True)
    hash_before = state_hash(model.unet)
    resume_step = 0
    unfinished = Checkpointer(checkpoint_of(out, done + 1))
    if cfg.resume and unfinished.exists():
        # the checkpoint must be the one of this request: its images, from the model the finished requests left
        tag = RequestState(done + 1, hashes[done], hash_before).tag()
        saved = unfinished.saved_extra() or {}
        if {k: saved.get(k) for k in tag} != tag:
            raise UserError(f"{unfinished.path} was written for other images or another model than "
                            f"request {done + 1} of {seq.requests} names now: restore the requests file as it was, "
                            f"or remove the checkpoint to run request {done + 1} from its start")
        resume_step = unfinished.last_step() or 0
        say(f"request {done + 1} continues from the checkpoint of step {resume_step}")
    # a resumed run's log keeps the finished requests' lines and the unfinished one's up to its checkpoint
    run = RunDir(out, config, cfg.overwrite,
                 keep=(lambda rec: rec.get("request", done + 1) <= done
                       or (rec.get("request") == done + 1 and rec["step"] <= resume_step)) if cfg.resume else None
                 ) if main else None
    acc.wait_for_everyone()  # with --overwrite, the previous run (its checkpoints too) is gone before anyone reads
    ledger = Ledger(out / LEDGER_NAME)
    model_in = {"dir": base.source, "sha256": state_hash(base.unet)}
    first_end = ends[min(done, len(requests) - 1)]
    measured = (evaluator.measure(model, stack[:first_end], None if stack_labels is None else stack_labels[:first_end])
                if main else None)
    strips, records = [], [_record_of(e) for e in read_ledger(out / LEDGER_NAME).entries] if done else []
    removed_so_far: set[int] = {i for idx in requests[:done] for i in idx}
    # the final verification's fresh seeds lie past the seeds every request's gate searched (one budget and gate)
    fresh_from = fresh_blocks_after(cfg.verify, cfg.check_seeds) if cfg.until else 0
    method = None
    for k, idx in enumerate(requests, 1):
        if k <= done:
            continue
        first = ends[k - 2] if k > 1 else 0
        sel = slice(first, ends[k - 1])
        before = evaluator.metrics(measured, sel) if main else None
        removed_so_far.update(idx)
        keep = [i for i in range(len(data)) if i not in removed_so_far]
        kept = encoded.subset(keep)  # lazy: decoded per step
        forget = encoded.subset(idx)
        request_labels = None if labels is None else (labels[keep], labels[idx])
        names = [data.names[i] for i in idx]
        say(f"request {k}/{len(requests)}: removing {len(idx)} images ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}); {len(kept)} kept")

        def log(rec, k=k):
            run.log({"request": k, **rec})
            if rec["step"] % max(1, cfg.log_every) == 0 or rec["step"] == trainer.steps:
                losses = " ".join(f"{n}={v:.4g}" for n, v in rec.items() if n.startswith("loss_"))
                say(f"  step {rec['step']}/{trainer.steps} {losses}")

        t0 = time.time()
        loop = None
        if cfg.until:  # this request's own closed loop, against the images still in the data
            view, view_idx = _without(data, removed_so_far - set(idx), idx)
            # held-out images without labels cannot be the reference of a class-conditional model: the kept are
            loop = UntilRemoved(model, view, view_idx, budget=cfg.verify, check_every=cfg.check_every,
                                seed=trainer.seed, gate_seeds=cfg.check_seeds,
                                held_out=None if model.conditional else held_out,
                                cache_dir=cfg.cache_dir or None, log=lambda m: say(f"  {m}"))
        checkpoint = Checkpointer(checkpoint_of(out, k), extra=RequestState(k, hashes[k - 1], hash_before, loop))
        trained = train_request(model, kept, forget, cfg.method, trainer, labels=request_labels,
                                checkpoint=checkpoint, log=log, callback=loop)
        new, method = trained.model, trained.method
        seconds = time.time() - t0
        hash_after = state_hash(new.unet)
        if main:
            t1 = time.time()
            upto = ends[min(k, len(requests) - 1)]
            previous, measured = measured, evaluator.measure(new, stack[:upto],
                                                             None if stack_labels is None else stack_labels[:upto])
            after = evaluator.metrics(measured, sel)
            so_far = evaluator.metrics(measured, slice(0, ends[k - 1]))
            after["forgotten_so_far"] = {"count": ends[k - 1],
                                         **{n: so_far[n] for n in ("similarity_mean", "membership_auc") if n in so_far}}
            entry = {"time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "removed": [{"index": i, "name": data.names[i], "sha256": h}
                                 for i, h in zip(idx, hashes[k - 1])],
                     "count": len(idx), **({"classes": by_class} if (by_class := class_counts(data, idx)) else {}),
                     "kept": len(kept), "method": method.name,
                     "settings": {**method.hyperparameters(), **{s: getattr(trainer, s) for s in SETTINGS}},
                     "metrics_before": before, "metrics_after": after, "seconds": round(seconds, 3),
                     "metrics_seconds": round(time.time() - t1, 3), "model_before": hash_before,
                     "model_after": hash_after, **({"until": loop.summary()} if loop is not None else {})}
            line = ledger.next_line(entry)
            try:
                save_model(new, run.model_dir, extra_files={LEDGER_NAME: ledger.contents(line)}, overwrite=True)
            except OSError as e:  # the previous request's model and ledger stay as they were
                keep_trained(e, checkpoint, new, (loop.stopped_at if loop is not None else None) or trainer.steps,
                             run.model_dir)
            ledger.append(line)
            checkpoint.path.unlink(missing_ok=True)
            strips.append((sel, previous.denoised[sel], measured.denoised[sel]))
            records.append(_record_of({"request": k, "count": len(idx), "metrics_before": before,
                                       "metrics_after": after, "seconds": round(seconds, 3),
                                       **({"until": entry["until"]} if loop is not None else {})}))
            if loop is not None:
                say(f"  {loop.line()}")
            say(f"request {k} done in {seconds:.1f} s: similarity ({before['similarity']}) "
                f"{before['similarity_mean']:.3f} -> {after['similarity_mean']:.3f}, {evaluator.quality_measure} "
                f"{before['quality']:.4g} -> {after['quality']:.4g}; model {hash_after[:12]} saved, ledger line {k} "
                "written")
        acc.wait_for_everyone()  # the next request starts once this one's model and ledger line are saved
        model, hash_before = new, hash_after
    if not main:
        return None

    # strips.png: per forgotten image, the original, its reconstruction before its request, right after it, at the
    # end (for the requests this invocation ran: a resumed run has no reconstructions of the earlier ones)
    tiles = [torch.stack([stack[sel][j], b[j], a[j], measured.denoised[sel][j]])
             for sel, b, a in strips for j in range(len(b))][:STRIP_IMAGES]
    save_grid(torch.cat(tiles), out / "strips.png", ncol=4, labels=["original", "before its request", "after it",
                                                                    "at the end"] * (len(tiles)))
    until_status = next((r["until"]["exit_status"] for r in records if r.get("until", {}).get("exit_status")), 0)
    summary = RequestsSummary(method=method.name, hyperparameters=method.hyperparameters(), steps=trainer.steps,
                              requests=len(requests), forget=len(order), kept=len(data) - len(order),
                              similarity=evaluator.backend.name, quality_measure=evaluator.quality_measure,
                              per_request=records, resumed_after_request=done or None,
                              resumed_at_step=resume_step or None, ledger=str(out / LEDGER_NAME),
                              ledger_head=line_hash(ledger.lines[-1]), model_in=model_in,
                              processes=acc.num_processes,
                              model_out={"dir": str(run.model_dir), "sha256": hash_before},
                              model=model_summary(model),
                              # the first request that was not removed sets the exit status
                              exit_status=until_status if cfg.until else None)
    run.finish(summary.to_dict())
    say(f"saved {run.model_dir} with {LEDGER_NAME}; strips.png: original | before | after its request | at the end")
    if cfg.verify != "off":  # every request's model and ledger line are saved: a failed verification is recorded
        from .verify import audit_settings, verify_run

        summary.verification = verify_run(
            out, base, model, data, order, cfg.verify, held_out=held_out, sscd=seq.sscd or None,
            seed=trainer.seed, similarity_t=seq.similarity_t,
            audit=audit_settings(cfg.audit, trainer.lr, trainer.batch_size, trainer.seed), fresh_block=fresh_from)
    return summary
