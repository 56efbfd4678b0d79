"""KV cache calibration: capture post-RoPE K and V at the cache write and summarise their range."""

from fp4kv_cli.calibration.calibrate import calibrate

__all__ = ["calibrate"]
