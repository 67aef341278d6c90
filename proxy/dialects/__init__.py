"""The APIs clients speak (OpenAI, ...), each translated onto the same pipeline."""
