"""A Linear whose weight stays packed (V:N:M and/or integer codes) and is computed through a kernel."""

from __future__ import annotations

import torch

from ..kernels import reference
from ..scheme import ModuleScheme


class PackedLinear(torch.nn.Module):
    """Drop-in for nn.Linear holding a lowc-packed weight; forward decodes through `kernels/reference.py`."""

    def __init__(self, scheme: ModuleScheme, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.scheme = scheme
        self.in_features = scheme.shape[1]
        self.out_features = scheme.shape[0]
        for suffix, t in tensors.items():
            self.register_buffer(suffix, t)

    def packed(self) -> dict[str, torch.Tensor]:
        return {suffix: getattr(self, suffix) for suffix in self.scheme.expected_tensors()}

    def dense_weight(self) -> torch.Tensor:
        """The float32 weight this module computes with (for inspection and tests; not used in forward)."""
        return reference.dense_weight(self.packed(), self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.packed_linear(x, self.packed(), self.scheme)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label()}"
