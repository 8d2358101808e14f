"""The training loop: recipes and overrides, optimisation, NaN skipping, resume after SIGKILL, FSDP on 2 CPU
processes, metrics, plot, release export."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import monovl
from random_checkpoint import write_random_checkpoint
from monovl.train import loop, metrics
from monovl.train.recipe import TrainConfig, apply_overrides, load_recipe, parse_override

RECIPE = """
[model]
preset = "debug"
stage = "{stage}"
[data]
batch_size = 4
seq_len = 24
[optim]
lr = 3e-3
[schedule]
steps = {steps}
warmup_steps = 2
[checkpoint]
every = {every}
keep_last = 2
[run]
out_dir = "{out}"
threads = 1
progress = false
tensorboard = {tb}
"""


def write_recipe(tmp_path, name="r.toml", stage="full", steps=6, every=0, tb="false", out=None) -> Path:
    path = tmp_path / name
    out = out or tmp_path / "run"
    path.write_text(RECIPE.format(stage=stage, steps=steps, every=every, tb=tb, out=out))
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in metrics.read_metrics(run_dir)]


# ---------------------------------------------------------------- recipes


def test_recipe_toml_and_typed_overrides(tmp_path):
    cfg = load_recipe(write_recipe(tmp_path, steps=7), ["optim.lr=5e-4", "model.activation_checkpointing=true",
                                                        "model.trainable=['mlp1.*']", "run.out_dir=/x/y"])
    assert cfg.schedule.steps == 7 and cfg.data.seq_len == 24
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.activation_checkpointing is True and cfg.model.trainable == ["mlp1.*"]
    assert cfg.run.out_dir == "/x/y"
    assert parse_override("schedule.steps=12") == ("schedule", "steps", 12)
    base = TrainConfig()
    apply_overrides(base, ["optim.lr=1.0"])
    assert base.optim.lr == 1e-4  # overrides copy, never mutate


@pytest.mark.parametrize("text, match", [
    ("optim.lrr=1", "optim.lrr"), ("optimiser.lr=1", "optimiser"), ("schedule.steps=ten", "schedule.steps"),
    ("schedule.steps=1.5", "schedule.steps"), ("nodot=1", "section.key=value")])
def test_bad_overrides_name_the_key(text, match):
    with pytest.raises(ValueError, match=match):
        parse_override(text)


def test_unknown_recipe_key_is_an_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlearning_rate = 1e-3\n")
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_recipe(path)


def test_shipped_recipes_parse_and_declare_their_stage():
    root = Path(__file__).resolve().parents[1] / "recipes"
    packaged = Path(__file__).resolve().parents[1] / "src" / "monovl" / "recipes"  # the tiny EViP chain
    files = sorted(root.rglob("*.toml")) + sorted(packaged.rglob("*.toml"))
    assert len(files) >= 15
    stages = {"s1_1": "s1.1", "s1_2": "s1.2", "s1_3": "s1.3", "s2_": "s2"}
    for f in files:
        cfg = load_recipe(f)
        if f.is_relative_to(root) and f.relative_to(root).parts[0] in ("evip", "evip_pp", "qwen2.5-1.5b",
                                                                       "qwen3-1.7b"):  # the 2B-scale recipes
            assert cfg.model.stage == next(v for k, v in stages.items() if f.name.startswith(k)), f
            assert cfg.data.kind == "mix" and cfg.data.sources and cfg.model.activation_checkpointing, f


def test_lr_schedule_warmup_then_cosine():
    f = loop.lr_lambda(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1) and f(12) == pytest.approx(0.55)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


# ---------------------------------------------------------------- the loop


def test_delta_tuning_learns_keeps_text_logits_and_exports(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "start")
    cfg = load_recipe(write_recipe(tmp_path, stage="s1.1", steps=12, every=5, tb="true"),
                      [f"model.path={ckpt}", "optim.lr=1e-2"])
    result = loop.train(cfg)
    seq = losses(cfg.run.out_dir)
    assert len(seq) == 12 and result["losses"] == seq and result["skipped"] == 0
    states = sorted(p.name for p in (Path(cfg.run.out_dir) / "checkpoints").iterdir())
    assert states == ["step_00000010", "step_00000012"]  # keep_last = 2, including the final state
    assert list((Path(cfg.run.out_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((Path(cfg.run.out_dir) / "recipe.json").read_text())["optim"]["lr"] == 1e-2
    before, tok = monovl.load(ckpt)
    after, _ = monovl.load(result["final"])  # the release format, with the tokenizer
    ids = torch.tensor([tok.encode("The green triangle is left of the yellow star.")])
    with torch.no_grad():
        assert torch.equal(before(ids), after(ids))  # S1.1 freezes the whole LLM: text logits bit-identical
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert changed and all(n.startswith(("vision_model.", "mlp1.")) or "_ve." in n for n in changed)


def test_lora_on_visual_experts_is_merged_on_export(tmp_path):
    cfg = load_recipe(write_recipe(tmp_path, stage="s1.1", steps=3), [  # LoRA freezes the experts' base weights
        "optim.lr=1e-2", "model.lora_targets=['*.feed_forward_ve.*']", "model.lora_rank=4"])
    before, _ = loop.build_model(cfg, torch.device("cpu"))
    result = loop.train(cfg)
    after = monovl.load_model(result["final"], image_token_id=before.cfg.image_token_id)
    assert [n for n, _ in after.named_parameters()] == [n for n, _ in before.named_parameters()]
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))}
    assert any(".feed_forward_ve.w2." in n for n in changed)  # B A merged into the base weight
    assert all(n.startswith(("vision_model.", "mlp1.")) or ".feed_forward_ve." in n for n in changed)


def test_full_tuning_learns(tmp_path):
    cfg = load_recipe(write_recipe(tmp_path, steps=15), ["checkpoint.export=false"])
    seq = loop.train(cfg)["losses"]
    assert sum(seq[-3:]) / 3 < sum(seq[:3]) / 3 - 0.15


def test_real_data_mix_from_text_jsonl(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "start")
    lines = ["A red circle sits above a blue square.", "How many shapes are in the picture? Three."] * 8
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = load_recipe(write_recipe(tmp_path, steps=3), [
        f"model.path={ckpt}", "data.kind=mix", f"data.sources=[{{kind = 'text', path = '{tmp_path / 't.jsonl'}'}}]",
        "data.batch_size=2", "data.options={max_tiles = 2}"])
    assert monovl.load_model(ckpt).cfg.max_dynamic_patch != 2
    result = loop.train(cfg)
    assert len(result["losses"]) == 3 and all(x == x for x in result["losses"])
    # the export says the tile budget it trained with, as the official fine-tuning writes its data arguments
    assert json.loads((Path(result["final"]) / "config.json").read_text())["max_dynamic_patch"] == 2
    with pytest.raises(ValueError, match="data.sources"):
        loop.train(apply_overrides(cfg, ["data.sources=[{kind = 'text', paht = 'x'}]"]))


def test_grad_accumulation_and_activation_checkpointing_match(tmp_path):
    base = load_recipe(write_recipe(tmp_path, steps=3), ["checkpoint.export=false", "data.batch_size=8"])
    ref = loop.train(apply_overrides(base, [f"run.out_dir={tmp_path / 'a'}"]))["losses"]
    accum = loop.train(apply_overrides(base, [f"run.out_dir={tmp_path / 'b'}", "data.batch_size=4",
                                              "optim.grad_accum=2"]))["losses"]
    ac = loop.train(apply_overrides(base, [f"run.out_dir={tmp_path / 'c'}",
                                           "model.activation_checkpointing=true"]))["losses"]
    assert accum == pytest.approx(ref, rel=1e-5, abs=0)
    assert ac == pytest.approx(ref, rel=1e-5, abs=0)
    model, _ = loop.build_model(base, torch.device("cpu"))
    names = [n for n, _ in model.named_parameters()]
    from monovl.train.parallel import apply_ac
    assert [n for n, _ in apply_ac(model).named_parameters()] == names  # no wrapper prefixes


class NaNEvery:
    """Synthetic batches, with NaN pixels on the chosen micro-batch indices."""

    def __init__(self, cfg, model_cfg, bad):
        self.inner, self.bad = loop.SyntheticData(cfg, model_cfg), set(bad)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)

    def __iter__(self):
        return self

    def __next__(self):
        i = self.inner.index
        b = next(self.inner)
        if i in self.bad:
            b["pixel_values"] = torch.full_like(b["pixel_values"], float("nan"))
        return b


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    cfg = load_recipe(write_recipe(tmp_path, steps=8), ["checkpoint.export=false", "run.max_consecutive_nonfinite=3"])
    mcfg = loop.build_model(cfg, torch.device("cpu"))[0].cfg
    result = loop.train(cfg, data=NaNEvery(cfg, mcfg, bad={2, 5}))
    seq = result["losses"]
    assert result["skipped"] == 2 and [i for i, x in enumerate(seq) if x != x] == [2, 5]
    assert metrics.read_metrics(cfg.run.out_dir)[-1]["skipped"] == 2
    cfg2 = apply_overrides(cfg, [f"run.out_dir={tmp_path / 'stop'}"])
    with pytest.raises(loop.NonFiniteLossError, match="3 non-finite"):
        loop.train(cfg2, data=NaNEvery(cfg2, mcfg, bad={3, 4, 5, 6}))
    assert [p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()] == ["step_00000006"]


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "monovl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    recipe = write_recipe(tmp_path, steps=40, every=5, out=tmp_path / "killed")
    proc = _cli("train", str(recipe), "--set", "checkpoint.export=false")
    target = tmp_path / "killed" / "checkpoints" / "step_00000010"
    deadline = time.time() + 60
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(losses(tmp_path / "killed")) < 40
    resumed = _cli("train", str(recipe), "--set", "checkpoint.export=false")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    cfg = load_recipe(recipe, [f"run.out_dir={tmp_path / 'straight'}", "checkpoint.export=false"])
    straight = loop.train(cfg)["losses"]
    assert losses(tmp_path / "killed") == straight  # exact: fp32, one thread, deterministic data


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path):
    recipe = write_recipe(tmp_path, stage="s1.3", steps=3, out=tmp_path / "fsdp")
    flat = "optim.min_lr_ratio=1.0"  # constant lr after warmup: the schedule does not depend on the step count

    def torchrun(steps, *extra):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "monovl.cli", "train", str(recipe), "--set", flat, "--set",
                            f"schedule.steps={steps}", *extra], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    torchrun(3)
    cfg = load_recipe(recipe, [f"run.out_dir={tmp_path / 'single'}", flat])
    single = loop.train(cfg)
    assert losses(tmp_path / "fsdp") == pytest.approx(single["losses"], rel=1e-5, abs=0)
    longer = loop.train(apply_overrides(cfg, [f"run.out_dir={tmp_path / 'longer'}", "schedule.steps=7"]))
    # states are full state dicts: FSDP's resume in one process, and one process's under FSDP (a finished run
    # extended to more steps is a changed recipe: it needs --force)
    loop.train(apply_overrides(cfg, [f"run.out_dir={tmp_path / 'fsdp'}", "schedule.steps=5"]), force=True)
    torchrun(7, "--force")
    assert losses(tmp_path / "fsdp") == pytest.approx(longer["losses"], rel=1e-5, abs=0)
    img = single["final"] and loop.build_model(cfg, torch.device("cpu"))[0].cfg.image_token_id
    a = monovl.load_model(tmp_path / "fsdp" / "final", image_token_id=img)
    b = monovl.load_model(longer["final"], image_token_id=img)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_plot_cli_writes_a_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 - s / 10, "lr": 1e-4 * s}) + "\n"
                                               for s in range(1, 6)))
    from monovl.cli import main
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        metrics.plot(tmp_path)


@pytest.mark.slow
def test_bench_measures_delta_and_full():
    from monovl.train.memory import measure
    delta = measure("s1.1", "debug", 0, 2, 32, 1, "cpu", ac=True)
    full = measure("full", "debug", 0, 2, 32, 1, "cpu", ac=False)
    assert delta["params"] == full["params"] == full["trainable"] > delta["trainable"] > 0
    assert delta["tokens_per_s"] > 0 and isinstance(full["peak_bytes"], int)  # meaningful in a fresh process only
