"""Datalist JSON files: ``{"training": [...], "test": [...]}`` with entries ``{"image", "brainmask"?, "label"?}``.

Paths in the file are relative to the file's folder (or absolute). :func:`load_datalist` resolves and checks them
and reports every problem at once; :func:`write_datalist` writes paths relative to the file, atomically.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.errors import InputError, read_json
from pipeline.io import atomic_write_json

__all__ = ["PATH_KEYS", "SUBJECT_KEY", "load_datalist", "split_subjects", "subject_name", "write_datalist"]

PATH_KEYS = ("image", "brainmask", "label")
SUBJECT_KEY = "subject"  # optional: the subject's id, which every output about the entry is named by


def load_datalist(
    path: str | os.PathLike, key: str, required: Sequence[str] = ("image",), missing_ok: bool = False
) -> list[dict]:
    """Entries under ``key`` with absolute paths; raises :class:`InputError` listing every problem found.

    With ``missing_ok`` a datalist without ``key`` gives an empty list instead of an error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"datalist {path} does not exist; create it with scripts/prepare_datalist.py or "
            "scripts/make_demo_data.py."
        )
    content = read_json(path, "fix the file.", what="datalist")
    if isinstance(content, dict) and key not in content and missing_ok:
        return []
    if not isinstance(content, dict) or key not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise InputError(f"datalist {path} has no list '{key}' (it has {keys}); add it or choose another key.")
    entries = content[key]
    if not isinstance(entries, list) or not entries:
        raise InputError(f"datalist {path}: '{key}' must be a non-empty list of entries.")
    problems, resolved, subjects = [], [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"entry {i} is not an object")
            continue
        missing_keys = [k for k in required if k not in entry]
        if missing_keys:
            problems.append(f"entry {i} lacks {missing_keys}")
            continue
        item = dict(entry)
        subject = item.get(SUBJECT_KEY)
        if subject is not None and not _valid_subject(subject):
            problems.append(f"entry {i} '{SUBJECT_KEY}' must be a non-empty name without '/', got {subject!r}")
        elif subject is not None and subject in subjects:
            problems.append(f"entry {i} '{SUBJECT_KEY}' {subject!r} is not unique")
        elif subject is not None:
            subjects.add(subject)
        for k in PATH_KEYS:
            if item.get(k) is None:
                continue
            if not isinstance(item[k], str) or not item[k]:
                problems.append(f"entry {i} '{k}' must be a file path (a string), got {item[k]!r}")
                continue
            file = Path(item[k]) if os.path.isabs(item[k]) else path.parent / item[k]
            if not file.is_file():
                problems.append(f"entry {i} '{k}': {file} does not exist")
            item[k] = str(file)
        resolved.append(item)
    if problems:
        listed = "\n  ".join(problems)
        raise InputError(
            f"datalist {path} ('{key}') has {len(problems)} problem(s):\n  {listed}\n"
            "Fix the paths or regenerate the datalist."
        )
    return resolved


def _valid_subject(subject: object) -> bool:
    return (
        isinstance(subject, str)
        and subject.strip() not in ("", ".", "..")
        and "/" not in subject
        and "\\" not in subject
    )


def subject_name(entry: dict) -> str:
    """What outputs about ``entry`` are named by: its ``subject`` id, else its image file's name without the NIfTI
    extension (which layouts that name every subject's file alike, e.g. BraTS2013, do not tell apart)."""
    return entry.get(SUBJECT_KEY) or Path(entry["image"]).name.split(".nii")[0]


def write_datalist(datalist: Mapping[str, Sequence[dict]], path: str | os.PathLike) -> Path:
    """Write ``datalist`` to ``path`` (atomically), with file paths relative to its folder."""
    base = Path(path).resolve().parent
    out = {
        key: [
            {
                k: (os.path.relpath(Path(v).resolve(), base) if k in PATH_KEYS and v is not None else v)
                for k, v in entry.items()
            }
            for entry in entries
        ]
        for key, entries in datalist.items()
    }
    return atomic_write_json(out, path)


def split_subjects(entries: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split entries (one per subject) into ``(rest, held_out)`` with ``round(fraction * n)`` held out (>= 1 if
    ``fraction > 0`` and ``n >= 2``). Deterministic for a seed, independent of the order of ``entries``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}.")
    ordered = sorted(entries, key=lambda e: str(e["image"]))
    n_held = min(max(round(fraction * len(ordered)), 1 if fraction > 0 else 0), len(ordered) - 1)
    picked = set(random.Random(seed).sample(range(len(ordered)), n_held))
    rest = [e for i, e in enumerate(ordered) if i not in picked]
    held = [e for i, e in enumerate(ordered) if i in picked]
    return rest, held
