"""The `llama-gate` admin command."""
