"""llmbench: measure LLM training with real DeepSpeed and say which configuration to use."""

__version__ = "0.1.0"
