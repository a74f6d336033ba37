"""Adapters that plug sparsezoo's attention variants into other libraries (`.transformers`: Hugging Face)."""
