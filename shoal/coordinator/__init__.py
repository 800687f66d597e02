"""The coordinator: admission, catalog, queue, jobs; it reaches workers only through the worker protocol."""
