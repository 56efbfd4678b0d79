"""fp4kv inside lm-evaluation-harness (the ``lmeval`` extra): importing this package registers the
``fp4kv`` model (:class:`~fp4kv_cli.evaluate.harness.model.FP4KVLM`) in lm-eval's model
registry, so ``lm_eval.simple_evaluate(model="fp4kv", model_args="pretrained=...,kv_dtype=nvfp4")``
evaluates any lm-eval task with the KV cache stored in that format.

``python -m fp4kv_cli.evaluate.harness ...`` is lm-eval's own command line (``lm-eval run ...``,
every option of it) with the model registered; ``fp4kv eval lm-eval`` is fp4kv's front end to
the same evaluator (several formats side by side, local data, paired differences)."""

from __future__ import annotations

MODEL_NAME = "fp4kv"


def register() -> None:
    """Register ``fp4kv`` in lm-eval's model registry (lazily: the model module loads on first
    use), after lm-eval's built-in models. Idempotent."""
    import lm_eval.models  # noqa: F401  (lm-eval loads its built-ins only into an empty registry)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="fp4kv_cli.evaluate.harness.model:FP4KVLM")


register()
