"""A Linear whose weight stays packed (V:N:M and/or integer codes) and is computed through a kernel."""

from __future__ import annotations

import torch

from ..kernels import reference
from ..scheme import ModuleScheme

FAST_BITS = (4, 6, 8)  # weight widths the Triton W{4,6,8}A16 / A8 GEMMs take


def fast_kernel_name(scheme: ModuleScheme) -> str | None:
    """The Triton GEMM that computes `scheme` as the reference does ("wa16" or "wa8"), or None when only the
    reference path can (V:N:M, INT2/INT3, SLoRB branches)."""
    if scheme.vnm is not None or scheme.bits not in FAST_BITS or getattr(scheme, "slorb_group", None):
        return None
    return "wa16" if scheme.abits is None else "wa8"


class PackedLinear(torch.nn.Module):
    """Drop-in for nn.Linear holding a lowc-packed weight.

    By default forward decodes through `kernels/reference.py`. After `use_fast_kernel()` (what `lowc.load` does on
    CUDA) a dense INT4/INT6/INT8 module keeps its weight only in the Triton GEMMs' layout (no second copy, no dense
    bf16 weight) and computes fp16/bf16 inputs through `wa16_gemm` (A16) or `wa8_gemm` (A8/A6, after dividing by
    the `smooth` factors); float32 inputs still take the reference path.
    """

    def __init__(self, scheme: ModuleScheme, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.scheme = scheme
        self.in_features = scheme.shape[1]
        self.out_features = scheme.shape[0]
        self.kernel = "reference"
        self._k_pad = None  # set when the weight lives in the Triton layout (buffers lowbit_codes/high/scales)
        for suffix, t in tensors.items():
            self.register_buffer(suffix, t)

    def use_fast_kernel(self) -> bool:
        """Move the weight into the Triton GEMM layout when the scheme allows it; returns whether it did."""
        name = fast_kernel_name(self.scheme)
        if name is None or self._k_pad is not None:
            return self._k_pad is not None
        from ..kernels.lowbit_layout import to_lowbit_layout

        w = to_lowbit_layout(self.qweight, self.scales, self.scheme.bits, self.scheme.group, self.scheme.shape[1])
        del self.qweight, self.scales  # the kernel layout holds the same codes and scales (see packed())
        self.register_buffer("lowbit_codes", w.codes)
        self.register_buffer("lowbit_high", w.high)
        self.register_buffer("lowbit_scales", w.scales)
        self._k_pad = w.k_pad
        self.kernel = name
        return True

    @property
    def lowbit(self):
        """The weight in the Triton GEMM layout (a `LowbitWeight` view of this module's buffers), or None."""
        if self._k_pad is None:
            return None
        from ..kernels.lowbit_layout import LowbitWeight

        n, k = self.scheme.shape
        return LowbitWeight(self.scheme.bits, self.scheme.group, n, k, self._k_pad, self.lowbit_codes,
                            self.lowbit_high, self.lowbit_scales)

    def packed(self) -> dict[str, torch.Tensor]:
        """The canonical artifact tensors of this module (rebuilt exactly from the kernel layout when it has one)."""
        if self._k_pad is None:
            return {suffix: getattr(self, suffix) for suffix in self.scheme.expected_tensors()}
        from ..kernels.lowbit_layout import from_lowbit_layout

        out = {suffix: getattr(self, suffix) for suffix in self.scheme.expected_tensors()
               if suffix not in ("qweight", "scales")}
        out["qweight"], out["scales"] = from_lowbit_layout(self.lowbit)
        return out

    def dense_weight(self) -> torch.Tensor:
        """The float32 weight this module computes with (for inspection and tests; not used in forward)."""
        return reference.dense_weight(self.packed(), self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._k_pad is not None and x.dtype in (torch.float16, torch.bfloat16):
            bias = getattr(self, "bias", None)
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            if self.kernel == "wa16":
                from ..kernels.wa16_gemm import wa16_gemm

                return wa16_gemm(x, self.lowbit, bias)
            from ..kernels.wa8_gemm import wa8_gemm

            if self.scheme.smooth:
                x = (x.float() / self.smooth).to(x.dtype)
            return wa8_gemm(x, self.lowbit, bias, act_bits=self.scheme.abits)
        return reference.packed_linear(x, self.packed(), self.scheme)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label()}, "
                f"kernel={self.kernel}")
