"""Model cards: the ``README.md`` with YAML metadata that every model directory the tool saves carries, as diffusers
and the Hugging Face Hub expect. It says what the model was derived from (directory and weight hash), what was
removed (names and content hashes, never the images), by which method and settings, with what result."""

from __future__ import annotations

from importlib import metadata

import yaml

#: at most this many removed items are listed by name and hash in a card (the count is always exact)
LISTED = 200


def tool_version() -> str:
    try:
        return metadata.version("diffunlearn")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_card(title: str, what: str, meta: dict, sections: dict[str, str] | None = None) -> str:
    """``title`` and a one-paragraph ``what``; ``meta`` goes into the YAML front matter beside the library tags;
    ``sections`` are further Markdown sections (heading -> text)."""
    front = {"library_name": "diffusers", "tags": ["diffunlearn", "diffusion", "machine-unlearning"],
             "diffunlearn_version": tool_version(), **meta}
    body = [f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n", f"# {title}\n", what.strip() + "\n"]
    for head, text in (sections or {}).items():
        body.append(f"## {head}\n\n{text.strip()}\n")
    return "\n".join(body)


def unlearning_card(base: dict, method: str, hyperparameters: dict, trainer: dict, removed: list[dict],
                    kept: int, verification: str | None = None, classes: dict[str, int] | None = None) -> str:
    """The card of an unlearned model. ``base``: ``{"dir", "sha256"}``; ``removed``: ``{"name", "sha256"}`` per item;
    ``verification``: Markdown with the verdicts, once the model has been verified; ``classes``: for labelled data,
    how many removed items each class had."""
    meta = {"base_model": base["dir"], "base_model_sha256": base["sha256"],
            "unlearning": {"method": method, "hyperparameters": hyperparameters, "trainer": trainer,
                           "removed_count": len(removed), "kept_count": kept, "removed": removed[:LISTED]}}
    by_class = ""
    if classes:
        meta["unlearning"]["removed_classes"] = classes
        by_class = " (by class: " + ", ".join(f"{c}: {n}" for c, n in classes.items()) + ")"
    what = (f"This model is `{base['dir']}` (weights SHA-256 `{base['sha256'][:16]}...`) after removing "
            f"{len(removed)} training image(s){by_class} with the unlearning method `{method}` of diffunlearn, "
            f"fine-tuning for {trainer.get('steps')} steps while keeping the other {kept} images.")
    listed = "\n".join(f"- `{r['name']}` (content SHA-256 `{r['sha256']}`)" for r in removed[:LISTED])
    more = f"\n- ... and {len(removed) - LISTED} more (the count above is exact)" if len(removed) > LISTED else ""
    sections = {"Removed": listed + more,
                "Settings": "```yaml\n" + yaml.safe_dump({"method": {"name": method, **hyperparameters},
                                                          "trainer": trainer}, sort_keys=False) + "```"}
    if verification:
        sections["Verification"] = verification
    return model_card("Unlearned diffusion model", what, meta, sections)


def training_card(trained_on: str, images: int, settings: dict) -> str:
    meta = {"training": {"trained_on": trained_on, "images": images, **settings}}
    what = (f"A DDPM trained from scratch by diffunlearn on {images} images ({trained_on}); the exponential moving "
            "average of its weights is what is saved.")
    return model_card("Diffusion model trained by diffunlearn", what, meta,
                      {"Settings": "```yaml\n" + yaml.safe_dump(settings, sort_keys=False) + "```"})
