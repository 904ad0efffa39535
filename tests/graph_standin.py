"""CPU stand-ins for cat_core.graph.CudaGraphCapture, so graph replay's logic runs without a GPU.

`Recording` "captures" by keeping the closure (running it once, as a capture runs the Python
once) and "replays" by calling it again and writing the result into the same output tensor,
the way a CUDA graph rewrites its static outputs. It reads only the replay layer's static input
copies, so a missing input copy shows as a stale result. `Perturbed` replays a wrong result;
`FailingCapture` and `FailingReplay` raise.
"""
from __future__ import annotations

import torch


class Recording:
    instances: list = []  # every stand-in made, so tests can count captures and replays

    @staticmethod
    def unsupported(device):
        return None

    def __init__(self, device):
        self.device = device
        self.fn = self.output = None
        self.replays = 0
        type(self).instances.append(self)

    def capture(self, fn):
        self.fn = fn
        self.output = fn()
        return self.output

    def replay(self):
        self.replays += 1
        self.output.copy_(self.result(self.fn()))

    def result(self, out: torch.Tensor) -> torch.Tensor:
        return out


class Perturbed(Recording):
    def result(self, out):
        return out + 1e-2 * out.abs().mean()


class FailingCapture(Recording):
    def capture(self, fn):
        raise RuntimeError("stand-in capture failed")


class FailingReplay(Recording):
    def replay(self):
        if self.replays:  # the self-checked first replay succeeds; the next one fails
            raise RuntimeError("stand-in replay failed")
        super().replay()


def fresh(cls):
    """A subclass with its own instance list."""
    return type(cls.__name__, (cls,), {"instances": []})
