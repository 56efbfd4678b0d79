"""What engines load at run time: the vLLM plugin that serves K-centered KV. Imports ``quant/`` only."""
