"""Benchmark suites, one per module; each registers itself on import (see ``registry``)."""
