"""The mechanisms every press shares: the press contract, registries, adapters, RoPE, positions, applying a press."""
