"""Class names -> class ids, for ImageNet-1k or any pipeline's own class list.

Users think in names ("golden retriever"), the model in ids (207). The ImageNet names are the
WordNet lemmas of the 1000 classes (see ``source`` in data/imagenet_classes.json); every lemma
of a class is accepted, case-insensitively.
"""

from __future__ import annotations

import difflib
import json
import operator
from collections.abc import Iterable, Sequence
from importlib import resources

__all__ = ["IMAGENET_CLASSES", "ClassNameError", "get_label_ids", "load_imagenet_classes"]


def load_imagenet_classes() -> list[list[str]]:
    """The 1000 ImageNet classes in index order, each a list of names (main name first)."""
    text = resources.files("aim_hf").joinpath("data/imagenet_classes.json").read_text(encoding="utf-8")
    return json.loads(text)["classes"]


IMAGENET_CLASSES: list[list[str]] = load_imagenet_classes()
# An unknown name with no close match lists the classes when there are at most this many.
LISTED_CLASSES = 16


class ClassNameError(ValueError):
    """A class name that names no class, or several."""


def _lookup(names: Sequence[Sequence[str] | str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Lower-cased main names and all names, each -> the class ids that carry it."""
    main: dict[str, list[int]] = {}
    every: dict[str, list[int]] = {}
    for class_id, entry in enumerate(names):
        synonyms = [entry] if isinstance(entry, str) else list(entry)
        for position, name in enumerate(synonyms):
            key = name.strip().lower()
            if position == 0:
                main.setdefault(key, []).append(class_id)
            if class_id not in every.get(key, []):
                every.setdefault(key, []).append(class_id)
    return main, every


def _describe(class_id: int, names: Sequence[Sequence[str] | str]) -> str:
    entry = names[class_id]
    return f"{class_id} ({entry if isinstance(entry, str) else entry[0]})"


def _name_to_id(
    label: str, names: Sequence[Sequence[str] | str], main: dict[str, list[int]], every: dict[str, list[int]]
) -> int:
    key = label.strip().lower()
    # A main name beats a synonym ("harp" is class 594, not the harmonica's third name).
    ids = main.get(key) or every.get(key)
    if ids and len(ids) == 1:
        return ids[0]
    if ids:
        choices = ", ".join(_describe(i, names) for i in ids)
        raise ClassNameError(
            f"class name {label!r} is ambiguous: it names classes {choices}; pass the class id instead"
        )
    if key.isdecimal():  # e.g. "207" from a command line (isdigit() takes "²", which int() refuses)
        return _check_id(int(key), len(names))
    close = difflib.get_close_matches(key, list(every), n=5, cutoff=0.6)
    if close:
        hint = "; close matches: " + ", ".join(
            f"{c!r} -> {', '.join(_describe(i, names) for i in every[c])}" for c in close
        )
    elif len(names) <= LISTED_CLASSES:
        hint = f" (classes: {', '.join(n if isinstance(n, str) else n[0] for n in names)})"
    else:
        hint = ""
    raise ClassNameError(f"unknown class name {label!r}{hint}")


def _check_id(class_id: int, num_classes: int) -> int:
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class id {class_id} is out of range [0, {num_classes})")
    return class_id


def get_label_ids(
    labels: str | int | Sequence[str | int], names: Sequence[Sequence[str] | str] | None = None
) -> list[int]:
    """Class ids for class names and/or ids.

    Names match any synonym of a class, case-insensitively and ignoring surrounding spaces; a
    string of digits that is not a name is read as an id. ``names`` is the class list (one list
    of synonyms, or a single name, per class); ImageNet-1k by default. Unknown names raise a
    ValueError listing close matches, ambiguous ones the classes they could mean.
    """
    names = IMAGENET_CLASSES if names is None else names
    if isinstance(labels, str | bool | bytes | bytearray):  # bytes would iterate as byte values
        items = [labels]
    else:
        try:  # one id: int, numpy integer or integer scalar tensor
            items = [operator.index(labels)]
        except TypeError:
            items = list(labels) if isinstance(labels, Iterable) else [labels]
    main, every = _lookup(names)
    ids = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"class labels must be names or ids, got {item!r}")
        if isinstance(item, str):
            ids.append(_name_to_id(item, names, main, every))
            continue
        try:
            class_id = operator.index(item)
        except TypeError:
            raise ValueError(f"class labels must be names or ids, got {item!r}") from None
        ids.append(_check_id(class_id, len(names)))
    return ids
