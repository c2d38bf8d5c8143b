"""qsteer: inference-time alignment and search for language models on Ray."""

__version__ = "0.1.0"
