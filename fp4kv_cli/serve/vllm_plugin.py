"""vLLM general plugin entry point (``vllm.general_plugins``): serves fp4kv's K centering."""


def register() -> None:
    """Entry point vLLM calls in every process it starts; idempotent."""
