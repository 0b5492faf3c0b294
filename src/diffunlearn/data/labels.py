"""Class labels of a data set: how they are read and checked, the ``class=`` forget SPEC, and the labels a
class-conditional model is trained and measured with (matched to the model's classes by name). ``data`` arguments
are :class:`diffunlearn.data.ImageSet` objects (not imported here: the data module imports this one)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError


def check_labels(labels, classes, n: int, source: str) -> tuple[torch.Tensor, list[str]]:
    """Labels as int64 class indices and the class names: integer labels index ``classes`` (default: named by their
    index); string labels name their classes (sorted)."""
    a = np.asarray(labels).reshape(-1)
    if len(a) != n:
        raise UserError(f"data {source}: {len(a)} labels for {n} images")
    if a.dtype.kind in "US":
        names = sorted(set(a.tolist()))
        index = {c: i for i, c in enumerate(names)}
        return torch.tensor([index[c] for c in a.tolist()], dtype=torch.long), [str(c) for c in names]
    if a.dtype.kind not in "iu":
        raise UserError(f"data {source}: labels must be integer class indices or class names, found {a.dtype}")
    y = torch.from_numpy(a.astype(np.int64))
    if len(y) and int(y.min()) < 0:
        raise UserError(f"data {source}: labels must be >= 0 (class indices), found {int(y.min())}")
    top = int(y.max()) + 1 if len(y) else 0
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(top)]
    if top > len(classes):
        raise UserError(f"data {source}: label {top - 1} has no class name ({len(classes)} classes)")
    return y, classes


def require_labels(data, why: str) -> torch.Tensor:
    """The data's labels, or one line saying why there are none (no labels, or labels that cannot be used)."""
    if data.labels is None:
        problem = data.label_error or f"{data.source or 'the data'} has no class labels"
        raise UserError(f"{why}, but {problem}: give class subfolders (root/<class>/<image>) or an .npz with a "
                        "'labels' array")
    return data.labels


def folder_labels(names: list[str]) -> tuple[torch.Tensor | None, list[str] | None]:
    """Class labels of an image folder laid out as ``root/<class>/<image>`` (every image inside a subfolder): the
    classes are the subfolder names, sorted, and an image's class is its first path component. A folder with images
    at its top level has no labels."""
    if not names or not all("/" in n for n in names):
        return None, None
    top = [n.split("/", 1)[0] for n in names]
    classes = sorted(set(top))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[c] for c in top], dtype=torch.long), classes


def class_index(classes: list[str], name: str) -> int | None:
    """The index of a class given by name, or by its index written as a number that is not itself a class name;
    None when ``name`` is neither."""
    if name in classes:
        return classes.index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    return None


def check_model_labels(labels, classes: list[str], n: int, what: str) -> torch.Tensor:
    """``labels`` as an int64 tensor of length ``n``, each the index of one of a model's ``classes``."""
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(y) != n:
        raise UserError(f"{len(y)} {what} labels for {n} images")
    if len(y) and not (0 <= int(y.min()) and int(y.max()) < len(classes)):
        raise UserError(f"{what} labels must lie in 0..{len(classes) - 1} (the model's classes: "
                        f"{', '.join(classes)}), found {int(y.min())}..{int(y.max())}")
    return y


def forget_classes(spec: str, data) -> list[int]:
    """The class indices a ``class=7`` / ``class=cat,dog`` forget SPEC names (by class name, or by index when the
    name is a number that is not itself a class name)."""
    require_labels(data, f"--forget {spec} needs labelled data")
    wanted = [t.strip() for t in spec[len("class="):].split(",") if t.strip()]
    if not wanted:
        raise UserError("--forget class= names no class: write e.g. class=7 or class=cat,dog")
    present = sorted(set(data.labels.tolist()))
    out = []
    for name in wanted:
        c = class_index(data.classes, name)
        if c is None:
            raise UserError(f"class {name!r} is not a class of the data (its classes: {', '.join(data.classes)})")
        if c not in present:
            raise UserError(f"class {name!r} has no images in the data: nothing to forget")
        if c in out:
            raise UserError(f"--forget names class {name!r} twice")
        out.append(c)
    return out


def labels_for_model(data, classes: list[str], held_out: bool = False) -> torch.Tensor:
    """The data's labels (or its held-out images' labels) as the class indices of a model whose classes are
    ``classes``, matched by class name: a model trained on other class names, or unlabelled data, is refused."""
    if held_out:
        labels = data.held_out_labels
        if labels is None:
            raise UserError(f"the model is class-conditional but the held-out images of {data.source or 'the data'} "
                            "have no class labels")
    else:
        labels = require_labels(data, "the model is class-conditional")
    index = {c: i for i, c in enumerate(classes)}
    used = sorted(set(labels.tolist()))
    missing = [data.classes[c] for c in used if data.classes[c] not in index]
    if missing:
        raise UserError(f"the data's class {missing[0]!r} is not one of the model's classes ({', '.join(classes)}): "
                        "the data and the model must name the same classes")
    table = torch.tensor([index.get(c, -1) for c in data.classes], dtype=torch.long)
    return table[labels]


def unlearning_labels(model, data, forget: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What :func:`diffunlearn.unlearn` takes as ``labels`` for this model and forget set: (labels of X \\ A,
    labels of A) as the model's class indices for a class-conditional model, None for an unconditional one."""
    return split_labels(labels_for_model(data, model.classes), forget) if model.conditional else None


def class_counts(data, idx: list[int]) -> dict[str, int] | None:
    """How many of the items ``idx`` each class has (classes in index order), or None for unlabelled data."""
    if data.labels is None:
        return None
    counts = torch.bincount(data.labels[list(idx)], minlength=len(data.classes))
    return {data.classes[c]: int(n) for c, n in enumerate(counts) if n}


def split_labels(labels: torch.Tensor | None, forget: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(labels of X \\ A, labels of A) in the order of :func:`split_images`, or None for unlabelled data."""
    if labels is None:
        return None
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[list(forget)] = False
    return labels[mask], labels[~mask]
