"""vLLM general plugin entry point (``vllm.general_plugins``): serves fp4kv's K centering."""


def register() -> None:
    """Entry point vLLM calls in every process it starts; idempotent."""
    from fp4kv_cli.serve.vllm_centering import install

    install()
