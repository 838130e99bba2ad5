"""Core of mammo-dissect: hooks, plugin manager, configuration, pipeline, store, report and CLI."""
