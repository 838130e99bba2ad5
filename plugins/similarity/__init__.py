"""Built-in similarity functions."""
