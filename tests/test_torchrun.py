"""multi_gpu_train.json really runs under torchrun: two processes on CPU with the gloo backend (one short epoch)."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from bundle_utils import REPO

from custom.synthetic.acdc import make_acdc

TINY = [
    "--network_def#channels", "[4,4,4,4,4,4,4,4]",
    "--network_def#unet_out_channels", "4",
    "--network_def#final_conv_channels", "[4,4]",
]  # fmt: skip


# A rank of a two-rank gloo run on CPU can die in C++ (std::terminate -> SIGABRT, no Python traceback): seen twice in
# about 100 runs here (torch 2.13.0), not reproducible on demand; likely gloo's worker threads at teardown. The
# configs end with dist.barrier() before destroy_process_group to narrow it; the tests retry that one failure once.
GLOO_ABORT = "terminate called without an active exception"


def torchrun(cmd, cwd, outputs=()) -> str:
    """Run ``cmd`` (a torchrun command); the combined log, after asserting a clean exit. A run that only failed by
    that abort is retried once (``outputs`` removed first), with a warning; any other failure, or a second
    abort, fails the test."""
    for attempt in range(2):
        for path in outputs if attempt else ():
            shutil.rmtree(path, ignore_errors=True)
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240)
        log = proc.stdout + proc.stderr
        if proc.returncode == 0 or attempt == 1 or GLOO_ABORT not in proc.stderr:
            break
        warnings.warn(f"torchrun: a rank aborted in C++ ({GLOO_ABORT!r}); running once more")
    assert proc.returncode == 0, log[-3000:]
    return log


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
    log = torchrun(cmd, tmp_path, [tmp_path / "models", tmp_path / "out"])
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


def test_two_ranks_share_the_evaluation_pairs_and_rank_0_writes_one_merged_table(tmp_path):
    from monai.bundle import ConfigParser

    data = tmp_path / "acdc"
    make_acdc(str(data), n_subjects=3, n_test=2, shape=(64, 64, 16), seed=3)  # 2 test patients -> 4 pairs
    cfg = REPO / "bundles" / "segreg_acdc" / "configs"
    parser = ConfigParser()  # random weights of the tiny network with the record inference checks
    parser.read_config(str(cfg / "inference.json"))
    parser.read_meta(str(cfg / "metadata.json"))
    parser.update({k.lstrip("-"): eval(v) for k, v in zip(TINY[::2], TINY[1::2])})
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    net, info = parser.get_parsed_content("network_def"), parser.get_parsed_content("model_info")
    torch.save({"model": net.state_dict(), "segreg": info.state_dict()}, tmp_path / "models" / "model_edt_dice.pt")
    files = "[" + ",".join(f"'{cfg / f}'" for f in ("inference.json", "evaluate.json", "multi_gpu_evaluate.json")) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "monai.bundle", "run", "--config_file", files, "--dist_backend", "gloo", "--dataset_dir", str(data),
           "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--num_workers", "0",
           "--pixdim", "[3.6,3.6,10.0]", "--spatial_size", "[32,32,16]", *TINY]  # fmt: skip
    log = torchrun(cmd, tmp_path, [tmp_path / "eval"])
    assert log.count("SupervisedEvaluator - INFO - Epoch[1] Complete") == 2  # both ranks evaluated
    table = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    pairs = sorted(c["pair"] for c in table["cases"])
    assert len(pairs) == 4 and len(set(pairs)) == 4  # every pair once, from both ranks
    assert sorted(p.name[:-7] for p in (tmp_path / "eval" / "displacements").glob("*.nii.gz")) == pairs


def test_two_ranks_share_the_thorax_pairs_and_rank_0_writes_one_table_and_submission(tmp_path):
    """The training-free bundle under torchrun: each rank registers a share of the pairs and writes its files into
    the one Learn2Reg submission folder; rank 0 writes one table of all pairs."""
    from custom.synthetic.thorax import make_thorax

    data = make_thorax(str(tmp_path / "thorax"), n_subjects=2, shape=(32, 24, 24), n_keypoints=5, seed=2).parent
    cfg = REPO / "bundles" / "segreg_thorax" / "configs"
    files = "[" + ",".join(f"'{cfg / f}'" for f in ("inference.json", "evaluate.json", "multi_gpu_evaluate.json")) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "monai.bundle", "run", "--config_file", files, "--dist_backend", "gloo", "--dataset_dir", str(data),
           "--output_dir", str(tmp_path / "eval"), "--num_workers", "0", "--progress", "false",
           "--level_spacing_mm", "[8.0]", "--iterations", "[3]"]  # fmt: skip
    log = torchrun(cmd, tmp_path, [tmp_path / "eval"])
    assert log.count("SupervisedEvaluator - INFO - Epoch[1] Complete") == 2  # both ranks registered pairs
    table = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    pairs = sorted(c["pair"] for c in table["cases"])
    spec = json.loads((data / "ThoraxCBCT_dataset.json").read_text())
    assert len(pairs) == len(spec["registration_val"]) >= 2 and len(set(pairs)) == len(pairs)
    assert sorted(p.name[:-7] for p in (tmp_path / "eval" / "submission").glob("*.nii.gz")) == pairs
    assert all("tre_mm" in c for c in table["cases"])
