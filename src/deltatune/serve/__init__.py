"""Serving many adapters on one base model behind an OpenAI-compatible HTTP API, with mixed-adapter batches."""
