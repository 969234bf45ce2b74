"""Adapters: explicit, restorable changes to the networks (LoRA) and extra input vectors (embeddings)."""
