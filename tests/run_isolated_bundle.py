"""Run an exported bundle with this repository's ``custom`` package hidden: only MONAI and its dependencies remain.

Usage (what tests/test_export.py does): ``python run_isolated_bundle.py '<json>'`` with the keyword arguments of
``monai.bundle.scripts.run`` plus ``"repo"``, the repository root to hide. Prints ``CUSTOM_FROM <file>`` at the end:
the ``custom`` package the bundle used (its own copy).
"""

import importlib.util
import json
import os
import sys

args = json.loads(sys.argv[1])
repo = args.pop("repo")
sys.meta_path = [f for f in sys.meta_path if "editable" not in (repr(f) + type(f).__module__).lower()]
repo = os.path.realpath(repo)
env = os.path.realpath(sys.prefix)  # the running environment: a venv at <clone>/.venv lies inside the repository


def inside(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.realpath(path or "."), root]) == root


sys.path = [  # hide the repository (not a venv beside it, /x/repo-venv, nor one inside it, /x/repo/.venv)
    p for p in sys.path if "__editable__" not in p and (not inside(p, repo) or (env != repo and inside(p, env)))
]
if importlib.util.find_spec("custom") is not None:
    raise SystemExit(f"the repository's custom package is still importable from {importlib.util.find_spec('custom')}")

from monai.bundle.scripts import run  # noqa: E402

run(**args)
import custom  # noqa: E402

print("CUSTOM_FROM", custom.__file__)
