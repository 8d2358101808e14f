"""Evaluation on VLMEvalKit-format benchmark TSVs: reading and prompts (`bench`), scoring rules (`scoring`),
running a model and writing results (`run`)."""
from monovl.eval.benchmarks import Benchmark, Item, build_prompt, load_benchmark
from monovl.eval.run import evaluate, format_markdown

__all__ = ["Benchmark", "Item", "build_prompt", "evaluate", "format_markdown", "load_benchmark"]
