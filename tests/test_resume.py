"""Training keeps a "last" checkpoint with the whole training state every epoch; --resume continues it; an earlier
run is never overwritten silently."""

import pytest
import torch
from bundle_utils import TINY_NET, configs, error_text, run

from custom.synthetic.acdc import make_acdc

SMALL = {"pixdim": [3.6, 3.6, 10.0], "spatial_size": [32, 32, 16], "num_workers": 0, "val_interval": 1, **TINY_NET}
TRAIN = configs("segreg_acdc") / "train.json"


def test_resume_continues_the_run_and_a_second_run_is_refused(tmp_path):
    make_acdc(str(tmp_path / "acdc"), n_subjects=3, n_test=1, shape=(64, 64, 16), seed=3)
    kw = dict(dataset_dir=str(tmp_path / "acdc"), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "o"))
    with pytest.raises(Exception) as err:
        run([TRAIN], "train", epochs=1, resume=True, **kw, **SMALL)
    assert "train once without --resume first" in error_text(err.value)
    # a 2-epoch run stopped after its first epoch (as if interrupted)
    run([TRAIN], "train", epochs=2, **{"train#trainer#max_epochs": 1}, **kw, **SMALL)
    last = tmp_path / "models" / "last_model_edt_dice.pt"
    first = torch.load(last, weights_only=False)
    assert set(first) == {"model", "optimizer", "lr_scheduler", "segreg", "trainer", "run_state"}
    steps = first["trainer"]["iteration"]
    assert first["trainer"]["max_epochs"] == 1 and steps > 0 and first["lr_scheduler"]["last_epoch"] == 1
    with pytest.raises(Exception) as err:  # same folder, no flag: refused, nothing replaced
        run([TRAIN], "train", epochs=1, **kw, **SMALL)
    assert "--resume true" in error_text(err.value) and "--overwrite true" in error_text(err.value)
    run([TRAIN], "train", epochs=2, resume=True, **kw, **SMALL)
    second = torch.load(last, weights_only=False)
    assert second["trainer"]["iteration"] == 2 * steps  # one more epoch, not two
    adam = next(iter(second["optimizer"]["state"].values()))
    assert int(adam["step"]) == 2 * steps  # the optimizer state went on from the first run
    assert second["lr_scheduler"]["last_epoch"] == 2  # the same schedule, one step on
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    run([TRAIN], "train", epochs=1, overwrite=True, **kw, **SMALL)  # explicit: start again
    assert torch.load(last, weights_only=False)["trainer"]["iteration"] == steps


def test_a_killed_and_resumed_run_keeps_the_best_model_of_an_uninterrupted_one(tmp_path):
    """Same seed: 3 epochs straight vs 2 epochs, killed, resumed to 3. The resumed run restores the random generators
    (transforms, shuffling) and the best-metric record, so it trains the same weights and keeps the same best model
    (not a "new best" at a score equal to the saved one)."""
    make_acdc(str(tmp_path / "acdc"), n_subjects=3, n_test=1, shape=(64, 64, 16), seed=3)
    common = dict(dataset_dir=str(tmp_path / "acdc"), epochs=3, **SMALL)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([TRAIN], "train", ckpt_dir=str(straight), output_dir=str(tmp_path / "o1"), **common)
    run(
        [TRAIN],
        "train",
        ckpt_dir=str(killed),
        output_dir=str(tmp_path / "o2"),
        **{"train#trainer#max_epochs": 2},
        **common,
    )
    before = torch.load(killed / "model_edt_dice.pt", weights_only=False)
    run([TRAIN], "train", ckpt_dir=str(killed), output_dir=str(tmp_path / "o3"), resume="true", **common)
    for name in ("model_edt_dice.pt", "last_model_edt_dice.pt"):
        a, b = (torch.load(d / name, weights_only=False)["model"] for d in (straight, killed))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}: {k} differs")
    saved = torch.load(killed / "last_model_edt_dice.pt", weights_only=False)["run_state"]
    best_epoch = saved["best_metric"][1]
    if best_epoch <= 2:  # the best model came before the kill: the resumed run must not have replaced it
        for k, v in before["model"].items():
            torch.testing.assert_close(v, torch.load(killed / "model_edt_dice.pt", weights_only=False)["model"][k])


def test_a_last_checkpoint_of_an_earlier_version_still_resumes(tmp_path):
    """Checkpoints written before the run state was saved resume with a warning instead of failing."""
    make_acdc(str(tmp_path / "acdc"), n_subjects=3, n_test=1, shape=(64, 64, 16), seed=3)
    kw = dict(dataset_dir=str(tmp_path / "acdc"), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "o"))
    run([TRAIN], "train", epochs=2, **{"train#trainer#max_epochs": 1}, **kw, **SMALL)
    last = tmp_path / "models" / "last_model_edt_dice.pt"
    old = torch.load(last, weights_only=False)
    del old["run_state"]
    torch.save(old, last)
    run([TRAIN], "train", epochs=2, resume=True, **kw, **SMALL)
    assert torch.load(last, weights_only=False)["lr_scheduler"]["last_epoch"] == 2  # the second epoch ran
