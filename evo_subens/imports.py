"""Objects named ``'package.module:attribute'`` in a config (a model class, a data loader), imported with the
current folder on the import path, as ``python`` itself has it: a ``mynets.py`` next to one's config works
from the ``evo-subens`` command as it would from a script."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .errors import ConfigError


def import_object(spec: str, field: str, kind: str) -> Any:
    """The object ``spec`` (``'module:attribute'``, dotted attributes allowed) names; a :class:`ConfigError`
    on ``field`` saying what went wrong otherwise. ``kind`` names what is expected ("class", "function")."""
    def bad(reason: str) -> ConfigError:
        return ConfigError(field, f"an importable 'module:{kind}' ({reason})", spec)

    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise bad(f"the form is 'package.module:{kind}'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # last: the current folder never shadows an installed package
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = (f"; the current folder {cwd} is searched: run from the folder holding it, or add that folder "
                f"to PYTHONPATH" if exc.name == module_name.split(".")[0] else "")
        raise bad(f"importing '{module_name}' failed: {type(exc).__name__}: {exc}{hint}") from None
    except Exception as exc:  # a broken user module can raise anything while importing
        raise bad(f"importing '{module_name}' failed: {type(exc).__name__}: {exc}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise bad(f"'{module_name}' has no attribute '{attr_path}'") from None
    if not callable(obj):
        raise bad(f"'{attr_path}' is a {type(obj).__name__}, not a {kind}")
    return obj
