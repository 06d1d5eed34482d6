"""Contract tests: our wrappers against stand-in models with the real signatures."""
