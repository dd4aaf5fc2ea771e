"""Bundle variants: one config id ``variant`` picks an entry of the config's ``variants`` dict, in every bundle.

A variant entry holds what differs between variants (mask loss module, loss weights, ``global_region``, ...). Users
add a variant with an override file merged by ``--config_file`` (``{"variants#mine": {...}, "variant": "mine"}``).
Each variant trains into its own checkpoint ``models/model_<variant>.pt`` (see :mod:`custom.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping


def select_variant(variants: Mapping, name: str) -> Mapping:
    """The settings of variant ``name``; a clear error naming the choices for an unknown name."""
    if not isinstance(name, str) or name not in variants:
        raise ValueError(
            f"unknown variant {name!r}; choose one of {sorted(variants)} (config id 'variant'), or add one with an "
            "override file that defines 'variants#<name>'."
        )
    return variants[name]


def checkpoint_name(variant: str) -> str:
    """File name of a variant's checkpoint: ``model_<variant>.pt``."""
    return f"model_{variant}.pt"
