import json
import subprocess
import sys


def test_make_data_cli_writes_the_layout(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "custom",
            "make-data",
            "--dataset",
            "thorax",
            "--out_dir",
            str(tmp_path),
            "--n_subjects",
            "1",
            "--shape",
            "[32,32,24]",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    spec = json.loads((tmp_path / "thorax" / "ThoraxCBCT_dataset.json").read_text())
    assert spec["numTraining"] == 3


def test_cli_rejects_unknown_dataset(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "custom", "make-data", "--dataset", "brain", "--out_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "unknown dataset" in out.stderr
