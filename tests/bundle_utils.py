"""Helpers for the bundle tests: paths, tiny-network overrides, running a config through ConfigWorkflow."""

import json
import tempfile
from pathlib import Path

import torch
from monai.bundle import ConfigParser, ConfigWorkflow

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"  # local copy of the Model Zoo schema (offline)
# one folder for every workflow's default output_dir, removed when the test process exits
OUTPUT_ROOT = tempfile.TemporaryDirectory(prefix="segreg_test_out_")

# a 4-level UNet with 4 channels per level keeps a training iteration on a 32x32x16 pair well under a second
TINY_NET = {
    "network_def#channels": [4, 4, 4, 4, 4, 4, 4, 4],
    "network_def#unet_out_channels": 4,
    "network_def#final_conv_channels": [4, 4],
}


def configs(bundle: str) -> Path:
    return REPO / "bundles" / bundle / "configs"


def workflow(files, workflow_type: str, **override) -> ConfigWorkflow:
    """A ConfigWorkflow; logs and outputs go to a temporary folder unless ``output_dir`` is given (nothing is written
    into the source tree)."""
    override.setdefault("output_dir", tempfile.mkdtemp(dir=OUTPUT_ROOT.name))
    wf = ConfigWorkflow(config_file=[str(f) for f in files], workflow_type=workflow_type, **override)
    wf.initialize()
    return wf


def run(files, workflow_type: str, **override):
    wf = workflow(files, workflow_type, **override)
    out = wf.run()
    wf.finalize()
    return out


def validate_metadata(bundle: str) -> dict:
    """The bundle's metadata with the keys the bundles rely on (the Zoo schema is checked in test_metadata_schema)."""
    meta = json.loads((configs(bundle) / "metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "network_data_format", "labels"):
        assert key in meta, key
    return meta


def error_text(err: BaseException) -> str:
    """The messages of an exception and its causes (ConfigWorkflow and MONAI wrap the original error)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


def random_checkpoint(bundle: str, path: Path, **override) -> Path:
    """Weights of the bundle's (tiny) network with the checkpoint record its inference config checks."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser.read_meta(str(REPO / "bundles" / bundle / "configs" / "metadata.json"))
    parser.update(override)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    info = parser.get_parsed_content("model_info")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "segreg": info.state_dict()}, path)
    return path
