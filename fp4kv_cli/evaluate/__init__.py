"""GSM8K evaluation with the KV cache stored in a chosen format: prompts, generation, metrics,
fidelity and results."""
