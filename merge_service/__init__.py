"""merge-service: merge fine-tuned models and LoRA adapters with SVD-based methods."""

__version__ = "0.1.0"
