"""The user-caused error (:class:`InputError`: bad input data, a bad value, a bad file) and reading a JSON file with
it. Every entry point turns an :class:`InputError` into one line and exit status 2 (:mod:`pipeline.bundle_support`,
``scripts/``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["InputError", "find_cause", "read_json"]


class InputError(ValueError):
    """Bad input data: the message names the file and says what to do."""


def find_cause(exc: BaseException | None, kinds: type | tuple[type, ...]) -> BaseException | None:
    """The first error of the types ``kinds`` in ``exc``'s chain of causes (``exc`` itself, then ``__cause__`` or
    ``__context__``), or None: the error that MONAI's or MLflow's wrappers hide under their own."""
    while exc is not None:
        if isinstance(exc, kinds):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def read_json(path: str | os.PathLike, fix: str, what: str = "") -> object:
    """The content of the JSON file ``path``; invalid JSON raises :class:`InputError` in one line naming the file
    (``what`` it is, if given), the parser's complaint and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{what + ' ' if what else ''}{path} is not valid JSON ({err}); {fix}") from err
