"""A small random release-format checkpoint (debug preset, BPE tokenizer): the whole pipeline, meaningless answers."""
from pathlib import Path

from monovl.checkpoint import save_model
from monovl.config import preset
from monovl.scratch import new_model
from monovl.tokenizer import build_bpe_tokenizer

SAMPLE_TEXT = """A red circle sits above a blue square. The green triangle is left of the yellow star.
How many shapes are in the picture? There are three shapes: two circles and one square.
What colour is the large star? The large star is purple. Describe the image in detail.
The image shows a small orange square in the top right corner and a white circle in the centre.
Answer the question using a single word or phrase. Please answer yes or no. Yes. No.
0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus equals one two three four five six seven eight nine ten."""


def write_random_checkpoint(path, preset_name: str = "debug", seed: int = 0) -> Path:
    """Write a randomly initialised release-format checkpoint with a small BPE tokenizer to `path`."""
    path = Path(path)
    tokenizer = build_bpe_tokenizer([SAMPLE_TEXT] * 4, vocab_size=400, out_dir=path)
    cfg = preset(preset_name, vocab_size=tokenizer.vocab_size)
    cfg.image_token_id = tokenizer.img_context_id
    # N(0, 0.02²) weights, not the width's own scale: this model's greedy answers then run on to the token limit,
    # which the streaming, stop and limit tests rely on
    save_model(new_model(cfg, seed, std=0.02), path, tokenizer=tokenizer)
    return path
