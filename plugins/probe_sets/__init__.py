"""Built-in probe-set readers."""
