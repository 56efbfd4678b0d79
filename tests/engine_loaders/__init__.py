"""Re-implementations of how SGLang, vLLM and TensorRT-LLM find and use KV scales in a
checkpoint, written from their sources (each module names the files it mirrors), so tests can
load an export the way the engines do without installing them."""
