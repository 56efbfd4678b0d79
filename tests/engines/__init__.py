"""The real-engine tier: vLLM, SGLang and compressed-tensors code run on fp4kv exports."""
