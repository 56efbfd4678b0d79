"""Session fixtures of the real-engine tier (defined in engine_exports.py)."""

from engines.engine_exports import exports, models  # noqa: F401
