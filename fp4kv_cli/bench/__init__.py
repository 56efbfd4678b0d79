"""Benchmarks behind ``fp4kv bench``: each module measures one thing and returns plain records."""
