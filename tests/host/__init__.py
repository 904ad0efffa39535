"""Host-tier tests: need a ComfyUI checkout named by COMFYUI_PATH."""
