"""Training: monolithize an LLM, freeze per stage, LoRA, data, loops and recipes."""
