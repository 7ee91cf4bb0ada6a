"""Layer 3: model loading, LoRA adapters, corpora, the token cache and the DataModule."""
