"""`monovl train` against its run folder: a finished run is not redone, a changed recipe is not resumed silently,
and a folder that cannot be written, or a disk that fills, is one line naming the folder."""
import errno
import json
import shutil
import types

import pytest

from monovl.cli import main
from monovl.train import state
from test_train_loop import write_recipe


def one_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_finished_run_is_not_redone_and_a_changed_recipe_is_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path, steps=2)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    saved, weights = (run / "recipe.json").read_text(), (run / "final/model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 0
    assert "already finished: 2 steps" in capsys.readouterr().out
    assert (run / "final/model.safetensors").stat().st_mtime_ns == weights  # not exported again
    err = one_error(capsys, ["train", str(recipe), "--set", "optim.lr=1e-2", "--set", "run.progress=true"])
    assert "holds a run of another recipe (optim.lr: 0.003 → 0.01)" in err and "--force" in err
    assert (run / "recipe.json").read_text() == saved
    assert main(["train", str(recipe), "--set", "optim.lr=1e-2", "--set", "schedule.steps=3", "--force"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert json.loads((run / "recipe.json").read_text())["optim"]["lr"] == 0.01


def test_a_run_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").write_text("")
    monkeypatch.setattr("monovl.train.loop.prepare_model", lambda *a: pytest.fail("the model was built"))
    err = one_error(capsys, ["train", str(write_recipe(tmp_path, steps=2))])
    assert f"the run folder {tmp_path / 'run'} is a file, not a folder" in err


def test_too_little_disk_for_a_training_state_is_found_before_the_first_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("monovl.train.preflight.shutil", types.SimpleNamespace(
        disk_usage=lambda p: types.SimpleNamespace(free=10_000)))
    monkeypatch.setattr("monovl.train.loop._optimizer_step", lambda *a: pytest.fail("a step was run"))
    err = one_error(capsys, ["train", str(write_recipe(tmp_path, steps=2))])
    assert f"the run folder {tmp_path / 'run'} has 0.0 MiB free; a training state and the exported model" in err


def test_a_disk_that_fills_while_a_state_is_written_names_the_folder(tmp_path, capsys, monkeypatch):
    def torch_save_on_a_full_disk(obj, path):  # how torch.save reports it
        path.write_bytes(b"x")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(state, "_save_file", torch_save_on_a_full_disk)
    monkeypatch.setattr(state, "shutil", types.SimpleNamespace(
        rmtree=shutil.rmtree, disk_usage=lambda p: types.SimpleNamespace(free=512)))
    err = one_error(capsys, ["train", str(write_recipe(tmp_path, steps=2))])
    assert (f"cannot write the training state step_00000002 in {tmp_path / 'run/checkpoints'}: no space left on "
            "the disk (512 bytes free)") in err
    assert not list((tmp_path / "run/checkpoints").iterdir())  # no torn state left


def test_a_metrics_write_on_a_full_disk_names_the_run_folder(tmp_path, capsys, monkeypatch):
    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("monovl.train.metrics.MetricsWriter.write", full)
    err = one_error(capsys, ["train", str(write_recipe(tmp_path, steps=2))])
    assert f"writing to the run folder {tmp_path / 'run'} failed: No space left on device" in err
