"""multi_gpu_train.json really runs under torchrun: two processes on CPU with the gloo backend (one short epoch)."""

import subprocess
import sys
from pathlib import Path

import torch
from bundle_utils import REPO

from custom.synthetic.acdc import make_acdc

TINY = [
    "--network_def#channels", "[4,4,4,4,4,4,4,4]",
    "--network_def#unet_out_channels", "4",
    "--network_def#final_conv_channels", "[4,4]",
]  # fmt: skip


def test_two_ranks_train_one_epoch_and_rank_0_saves_the_checkpoint(tmp_path):
    data = tmp_path / "acdc"
    make_acdc(str(data), n_subjects=4, n_test=1, shape=(64, 64, 16), seed=3)
    cfg = REPO / "bundles" / "segreg_acdc" / "configs"
    files = f"['{cfg / 'train.json'}','{cfg / 'multi_gpu_train.json'}']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "monai.bundle", "run", "training", "--config_file", files, "--dist_backend", "gloo",
           "--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "out"),
           "--epochs", "1", "--val_interval", "1", "--num_workers", "0", "--pixdim", "[3.6,3.6,10.0]",
           "--spatial_size", "[32,32,16]", *TINY]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # both ranks ran the trainer and the evaluator; only rank 0 logs the metrics and saves
    assert log.count("SupervisedTrainer - INFO - Epoch[1] Complete") == 2, log[-3000:]
    assert log.count("SupervisedEvaluator - INFO - Epoch[1] Complete") == 2
    assert log.count("Key metric: val_mean_dice best value") == 1
    saved = list((tmp_path / "models").glob("*.pt"))
    assert sorted(p.name for p in saved) == ["last_model_edt_dice.pt", "model_edt_dice.pt"]
    ckpt = torch.load(tmp_path / "models" / "model_edt_dice.pt", weights_only=False)
    assert ckpt["segreg"]["variant"] == "edt_dice"
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the DDP wrapper is not in the weights
    assert not (Path(tmp_path) / "eval").exists()
