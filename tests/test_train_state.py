"""Training states on disk: nothing left behind by failed or killed writes, damaged states passed over on resume."""
import logging
import os

import pytest
import torch

from monovl.train import loop, state


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


class _Data:
    def __init__(self):
        self.position = None

    def state_dict(self):
        return {"position": 5}

    def load_state_dict(self, s):
        self.position = s["position"]


def _save(ckpt, step, model, optimizer, keep_last=3):
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainer = {"scheduler": scheduler.state_dict(), "data": {"position": step}, "skipped": 0}
    return state.save_state(ckpt, step, model, optimizer, trainer, keep_last)


def test_a_failed_write_leaves_no_temporary_folder(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    real = state._save_file

    def disk_full(obj, path):
        if path.name == "optim.pt":
            raise OSError(28, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(state, "_save_file", disk_full)
    for _ in range(2):  # each retry after a disk-full error used to add another folder
        with pytest.raises(OSError, match="No space"):
            _save(tmp_path, 3, model, optimizer)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_killed_writes_are_cleaned_at_start(tmp_path, caplog):
    dead = tmp_path / ".tmp-step_00000004-99999999"  # no such process
    alive = tmp_path / f".tmp-step_00000004-{os.getppid()}"  # a live process may still be writing
    for p in (dead, alive):
        p.mkdir()
        (p / "model.pt").write_bytes(b"x" * 100)
    with caplog.at_level(logging.WARNING, logger="monovl.train.state"):
        assert state.clean_temporary(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and "unfinished" in caplog.text


def test_resume_passes_over_a_truncated_newest_state(tmp_path, caplog):
    model, optimizer = _model_and_optimizer()
    _save(tmp_path, 2, model, optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    newest = _save(tmp_path, 4, model, optimizer)
    data = newest / "model.pt"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # torn by a full disk or a crash
    assert "truncated" in state.state_problem(newest)
    fresh, fresh_opt = _model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0)
    with caplog.at_level(logging.WARNING, logger="monovl.train.state"):
        trainer = loop._resume(tmp_path, fresh, fresh_opt, scheduler, d := _Data())
    assert trainer[0] == 2 and d.position == 2 and "damaged" in caplog.text and "step_00000004" in caplog.text
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_resume_refuses_when_no_state_is_intact(tmp_path):
    model, optimizer = _model_and_optimizer()
    only = _save(tmp_path, 2, model, optimizer)
    (only / "trainer.pt").unlink()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(RuntimeError, match="no training state .* is intact"):
        loop._resume(tmp_path, model, optimizer, scheduler, _Data())


@pytest.mark.parametrize("override,words", [("schedule.steps=-5", "schedule.steps"), ("optim.betas=['a','b']", "betas"),
                                            ("optim.betas=[0.9]", "betas"), ("run.device=tpu", "run.device"),
                                            ("optim.lr=nan", "optim.lr"), ("data.batch_size=0", "data.batch_size"),
                                            ("model.expert_init=zeros", "model.expert_init")])
def test_bad_recipe_values_name_the_key_before_any_work(tmp_path, capsys, override, words):
    from monovl.cli import main
    from test_train_loop import write_recipe

    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe), "--set", override]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # no untrained final/ and nothing else written
