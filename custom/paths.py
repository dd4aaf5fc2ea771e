"""Path helpers for bundle configs: locate a bundle's root from any working directory."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def bundle_root(name: str) -> str:
    """Root folder of bundle ``name`` so configs work from any working directory.

    Looks, in order, at the folder that holds ``custom/`` (an exported bundle carries ``custom/`` inside its root)
    and at ``<repo>/bundles/<name>`` (an editable install of this repository); falls back to the working
    directory. Override with ``--bundle_root`` when the bundle lives elsewhere.
    """
    for cand in (PACKAGE_PARENT, PACKAGE_PARENT / "bundles" / name):
        meta = cand / "configs" / "metadata.json"
        if meta.is_file() and (cand.name == name or '"' + name + '"' in meta.read_text()):
            return str(cand)
    return os.getcwd()
