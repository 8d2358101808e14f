"""Hostile input to `monovl eval`, `world` and `chat`, and to the numeric flags of every command: one line on
stderr, exit code 2, no traceback, and nothing is lost that was already computed."""
import errno
import json

import pytest

import monovl.checks
from monovl.cli import main
from monovl.eval import run
from monovl.eval.benchmarks import load_benchmark
from pictures import b64, png


def one_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def write_tsv(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: the input checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr("monovl.load", refuse)


def test_eval_checks_the_output_folder_before_loading_the_model(tmp_path, capsys, no_model):
    tsv = write_tsv(tmp_path / "v.tsv", "index\tquestion\tanswer\n0\tq\tx\n")
    (tmp_path / "file").write_text("")
    err = one_error(capsys, ["eval", "--model", "m", "--bench", str(tsv), "--out", str(tmp_path / "file")])
    assert f"the output folder {tmp_path / 'file'} is a file" in err
    err = one_error(capsys, ["eval", "--model", "m", "--bench", str(tsv), "--out", str(tmp_path / "file" / "sub")])
    assert "cannot write to the output folder" in err and "Not a directory" in err


def test_eval_reads_the_benchmarks_before_loading_the_model(tmp_path, capsys, no_model):
    binary = tmp_path / "bin.tsv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    err = one_error(capsys, ["eval", "--model", "m", "--bench", str(binary), "--out", str(tmp_path / "o")])
    assert f"{binary} is not a UTF-8 text file" in err
    short = write_tsv(tmp_path / "short.tsv", "index\tquestion\tanswer\n0\tq\tx\n1\tonly a question\n")
    err = one_error(capsys, ["eval", "--model", "m", "--bench", str(short), "--out", str(tmp_path / "o")])
    assert f"{short}:3: 2 cells where the header has 3 columns" in err


def test_a_short_broken_base64_cell_is_image_data_not_an_index(tmp_path):
    good = b64(png((20, 20)))
    tsv = write_tsv(tmp_path / "b.tsv", f"index\tquestion\timage\n0\tq\t{good}\n1\tq\t0\n2\tq\tiVBORw0KGgo*\n")
    items = load_benchmark(tsv).items
    assert items[1].images[0].load() == png((20, 20))  # "0" is the index of the row holding the image
    with pytest.raises(ValueError, match="invalid base64 image data"):
        items[2].images[0].load()


class _Interrupt(Exception):
    pass


def test_eval_streams_predictions_so_an_interrupted_run_keeps_them(random_loaded, tmp_path, monkeypatch):
    model, tokenizer = random_loaded
    tsv = write_tsv(tmp_path / "v.tsv", "index\tquestion\tanswer\n" + "".join(f"{i}\tq{i}\tx\n" for i in range(4)))
    calls = []

    def generate(model, ids, pixel_values=None, **kwargs):  # answers the first batch, then is interrupted
        calls.append(len(ids))
        if len(calls) > 1:
            raise _Interrupt
        import torch
        return torch.tensor([tokenizer.encode("yes") for _ in ids])
    monkeypatch.setattr(run, "generate", generate)
    with pytest.raises(_Interrupt):
        run.evaluate(model, tokenizer, tsv, out_dir=tmp_path / "o", batch_size=2, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "o/v.predictions.jsonl").read_text().splitlines()]
    assert [x["prediction"] for x in lines] == ["yes", "yes"] and {x["index"] for x in lines} <= {0, 1, 2, 3}


def test_predictions_files_name_themselves_when_broken(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "v.tsv", "index\tquestion\tanswer\n0\tq\tx\n")
    (tmp_path / "p.jsonl").write_text('{"index": 0, "prediction": "x"}\n{oops\n')
    err = one_error(capsys, ["eval", "--bench", str(tsv), "--predictions", str(tmp_path / "p.jsonl"),
                             "--out", str(tmp_path / "o")])
    assert f"{tmp_path / 'p.jsonl'}:2: not a line of JSON" in err
    (tmp_path / "p.xlsx").write_bytes(b"not a zip")
    err = one_error(capsys, ["eval", "--bench", str(tsv), "--predictions", str(tmp_path / "p.xlsx"),
                             "--out", str(tmp_path / "o")])
    assert "is not a readable .xlsx workbook" in err


def test_world_into_a_file_or_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in one_error(capsys, ["world", str(tmp_path / "file"), "--scale", "small"])
    err = one_error(capsys, ["world", str(tmp_path / "file" / "w"), "--scale", "small"])
    assert "cannot write to the world folder" in err

    def read_only(*a, **k):  # what a read-only mount answers (as root, chmod would not stop the test's writes)
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(monovl.checks.tempfile, "mkstemp", read_only)
    err = one_error(capsys, ["world", str(tmp_path / "ro"), "--scale", "small"])
    assert f"cannot write to the world folder {tmp_path / 'ro'}: Read-only file system" in err


def test_world_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import monovl.world as world

    def full(folder, scenes, rng=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "000000.png"))
    monkeypatch.setattr(world, "_write_images", full)
    err = one_error(capsys, ["world", str(tmp_path / "w"), "--scale", "small"])
    assert f"writing to the world folder {tmp_path / 'w'} failed: No space left on device" in err


def test_chat_checks_images_before_the_model(tmp_path, capsys, no_model):
    (tmp_path / "bad.png").write_text("not an image")
    err = one_error(capsys, ["chat", "--model", "m", "--image", str(tmp_path / "bad.png"), "--prompt", "x"])
    assert "bad.png: not an image" in err


def test_chat_image_with_a_text_only_model(tmp_path, capsys):
    from monovl.checkpoint import SHIPPED_MODEL

    llm = SHIPPED_MODEL.parent / "tiny-llm"
    (tmp_path / "ok.png").write_bytes(png((20, 20)))
    err = one_error(capsys, ["chat", "--model", str(llm), "--image", str(tmp_path / "ok.png"), "--prompt", "x"])
    assert "text-only LLM: it cannot take --image" in err


def test_a_token_budget_beyond_memory_is_refused_before_allocating(random_loaded):
    import monovl

    model, tokenizer = random_loaded
    with pytest.raises(ValueError, match=r"the KV cache of 1 × 1000000000\d+ positions needs .* GiB, more than"):
        monovl.generate(model, [[1, 2, 3]], max_new_tokens=10**12)
    with pytest.raises(ValueError, match="max_new_tokens = -1: must be a whole number >= 0"):
        monovl.generate(model, [[1, 2, 3]], max_new_tokens=-1)


@pytest.mark.parametrize("argv", [
    ["eval", "--bench", "x.tsv", "--batch-size", "0"], ["eval", "--bench", "x.tsv", "--max-new-tokens", "-1"],
    ["eval", "--bench", "x.tsv", "--limit", "0"], ["chat", "--max-tiles", "0"], ["serve", "--model", "m",
    "--port", "70000"], ["serve", "--model", "m", "--max-len", "0"], ["serve", "--model", "m", "--timeout", "nan"],
    ["loadtest", "--clients", "0"], ["loadtest", "--requests", "10001"], ["bench", "--decode-tokens", "0"],
    ["monolithize", "a", "b", "--seed", str(2**64)], ["demo", "--steps-scale", "0"],
])
def test_numeric_flags_of_every_command_are_range_checked(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("is outside" in err or "not an integer" in err) and "Traceback" not in err


@pytest.mark.parametrize("device,words", [("banana", "is not a torch device"), ("cuda:99", "CUDA device(s)")])
def test_a_device_this_machine_lacks_is_one_line(random_ckpt, capsys, device, words):
    err = one_error(capsys, ["chat", "--model", str(random_ckpt), "--prompt", "hi", "--device", device])
    assert f"device {device!r}" in err and words in err


def test_loadtest_without_a_server_is_one_line(capsys):
    import socket

    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = one_error(capsys, ["loadtest", "--url", f"http://127.0.0.1:{port}/v1", "--requests", "1", "--clients", "1",
                             "--time-limit", "5"])
    assert f"cannot list the models of the server at http://127.0.0.1:{port}/v1" in err


def test_monolithize_checks_its_output_folder_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("")
    err = one_error(capsys, ["monolithize", "llm", str(tmp_path / "file")])
    assert "is a file, not a folder" in err
