"""Built-in target loaders."""
