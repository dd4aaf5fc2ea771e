"""One reading of command-line values, for every ``python -m custom`` verb and every bundle config id that is a flag.

Python Fire and ``python -m monai.bundle run`` hand ``--overwrite false`` through as the *text* ``"false"``, which is
truthy; ``--noise_gate none`` arrives as ``"none"``. Every flag is read through :func:`as_bool` (and optional values
through :func:`optional`) before it is used, so the spellings users type mean what they say:

- booleans: ``true/false``, ``yes/no``, ``on/off``, ``1/0`` in any case (and Python's ``True``/``False``); anything
  else is refused with an :class:`~custom.validation.InputError` naming the option;
- "no value": ``none`` or ``null`` in any case (and Python's ``None``).
"""

from __future__ import annotations

from collections.abc import Mapping

from custom.validation import InputError

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
NONE = ("none", "null")


def as_bool(value, name: str) -> bool:
    """``value`` (a bool, 0/1, or one of the spellings above) as a bool; anything else is refused naming ``--name``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise InputError(f"--{name} takes true or false (also yes/no, on/off, 1/0), got {value!r}; e.g. --{name} false")


def auto_or_bool(value, name: str) -> bool | str:
    """``"auto"`` (any case) as ``"auto"``, else :func:`as_bool`; refusals name ``--name`` and add ``auto``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return as_bool(value, name)
    except InputError:
        raise InputError(f"--{name} takes auto, true or false (also yes/no, on/off, 1/0), got {value!r}") from None


def is_none(value) -> bool:
    """Whether ``value`` means "no value": ``None`` or the text ``none``/``null`` (any case)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE)


def optional(value):
    """``None`` for ``None``/``"none"``/``"null"``, else ``value`` unchanged."""
    return None if is_none(value) else value


def optional_float(value, name: str) -> float | None:
    """A number or "no value" (``none``/``null``); anything else is refused naming ``--name``."""
    if is_none(value):
        return None
    if isinstance(value, bool):
        raise InputError(f"--{name} takes a number or none, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"--{name} takes a number or none, got {value!r}; e.g. --{name} 2 or --{name} none") from None


def check_flags(values: Mapping[str, object]) -> dict[str, bool]:
    """Read every ``{config id: value}`` with :func:`as_bool` (bundle configs call it in ``initialize``, so a bad
    spelling is refused before any work); returns the booleans."""
    return {name: as_bool(value, name) for name, value in values.items()}
