"""Built-in dissectors."""
