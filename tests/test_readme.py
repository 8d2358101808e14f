"""The README's Python API example runs as written, on the shipped tiny model."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_builds_an_image_prompt_for_the_shipped_model(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    assert "../" not in re.sub(r"```.*?```", "", readme, flags=re.S), "the README points outside the repository"
    code = next(b for b in _python_blocks(readme) if "monovl.load()" in b and "build_inputs" in b)
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    model, tokenizer, inputs = ns["model"], ns["tokenizer"], ns["inputs"]
    s = model.cfg.vision.image_size
    assert s == 112 and inputs.pixel_values.shape == (sum(inputs.num_tiles), 3, s, s)
    n_visual = inputs.input_ids.tolist().count(tokenizer.img_context_id)
    assert n_visual == model.cfg.num_image_token * sum(inputs.num_tiles)
    assert ns["new_ids"].shape[0] == 1 and capsys.readouterr().out.strip()
