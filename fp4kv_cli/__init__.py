"""fp4kv: calibrate, export and evaluate 4-bit KV caches."""

__version__ = "0.1.0"
