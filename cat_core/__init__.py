"""CAT Pruning core: plain torch, no ComfyUI import (the host adapter lives in nodes/)."""
from .config import CATSettings, SettingsError
from .runtime import CallMode, ModelInfo, PruningRun, RunStats

__all__ = ["CATSettings", "SettingsError", "CallMode", "ModelInfo", "PruningRun", "RunStats"]
