"""ComfyUI nodes of the pack (V3 schema). Thin: all logic is in cat_core/ and nodes/patch.py."""
