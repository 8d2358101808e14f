"""OpenAI-compatible serving: a continuous-batching engine (`engine`) behind a FastAPI app (`api`)."""
from monovl.serve.engine import Engine, QueueFull, Request, SamplingParams

__all__ = ["Engine", "QueueFull", "Request", "SamplingParams"]
