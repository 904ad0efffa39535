"""Per-architecture block adapters: how one transformer block runs on the selected tokens."""
