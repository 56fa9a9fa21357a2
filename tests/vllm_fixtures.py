"""Session fixtures for real vLLM servers (filled in by the inference work)."""
