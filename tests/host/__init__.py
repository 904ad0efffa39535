"""Host-tier tests: need a ComfyUI checkout (COMFYUI_PATH, or the tree the pack is cloned into)."""
