"""``fp4kv run``: named presets (``configs/*.toml``) run end to end, with a report."""
