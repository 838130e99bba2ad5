"""Extraction executors beyond the built-in local loop."""
