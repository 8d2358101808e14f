"""monovl: run, train, serve and evaluate monolithic multimodal LLMs of the Mono-InternVL family."""
from monovl.chat import Conversation, chat
from monovl.checkpoint import CheckpointError, load_model, save_model
from monovl.generate import generate, stream_generate
from monovl.images import ImageError, load_image, load_pixel_values
from monovl.tokenizer import Tokenizer

__all__ = ["CheckpointError", "Conversation", "ImageError", "Tokenizer", "chat", "generate", "load", "load_image",
           "load_model", "load_pixel_values", "save_model", "stream_generate"]


def load(path, dtype=None, device=None):
    """(model, tokenizer) from a release-format folder."""
    return load_model(path, dtype=dtype, device=device), Tokenizer.from_dir(path)
