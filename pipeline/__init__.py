"""Find and ship the best LoRA adapter for a language model: tracked in MLflow, searched with Ax."""

__version__ = "0.1.0"
