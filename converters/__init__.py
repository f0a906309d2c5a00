"""Converters from Hugging Face checkpoints to the engine format."""
