"""Real servers the test suite starts as separate processes (see each module's docstring)."""
