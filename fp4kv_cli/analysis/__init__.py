"""Where FP4 KV loses accuracy: per-layer/head sensitivity, K error decomposition, recipes."""
