"""A Linear whose weight stays packed (V:N:M and/or integer codes) and is computed through a kernel."""

from __future__ import annotations

import torch

from ..kernels import reference
from ..kernels.hadamard import rotate_inputs
from ..kernels.packing import pack_int, unpack_int
from ..scheme import ModuleScheme

FAST_BITS = (4, 6, 8)  # weight widths the Triton W{4,6,8}A16 / A8 GEMMs take
WIDENED_BITS = (2, 3)  # computed by the same GEMMs with their codes widened to the INT4 layout (exact)
VNM_WEIGHT_TENSORS = ("columns", "positions", "values", "qweight", "scales")  # replaced by the SpMM layout


def layout_bits(bits: int) -> int:
    """The code width of the Triton GEMM layout a dense module of `bits`-bit codes computes in."""
    return 4 if bits in WIDENED_BITS else bits


def fast_kernel_name(scheme: ModuleScheme) -> str | None:
    """The GPU kernel that computes `scheme` as the reference does, or None when only the reference path can
    (SLoRB branches; V:N:M + A8/A6 with scale groups that are not a multiple of 32): "wa16" / "wa8" (dense low-bit
    Triton GEMMs; INT2/INT3 codes run in the INT4 layout), "vnm" (sparse tensor cores, 16-bit values: stored ones,
    or integer values dequantized at load when the inputs stay 16-bit), "vnm_int8" (sparse INT8 tensor cores,
    integer values with per-token A8/A6 inputs)."""
    if getattr(scheme, "slorb_group", None):
        return None
    if scheme.vnm is not None:
        if scheme.bits is None or scheme.abits is None:
            return "vnm"
        per_row = scheme.group >= scheme.stored_columns
        return "vnm_int8" if per_row or scheme.group % 32 == 0 else None
    if scheme.bits not in FAST_BITS + WIDENED_BITS:
        return None
    return "wa16" if scheme.abits is None else "wa8"


class PackedLinear(torch.nn.Module):
    """Drop-in for nn.Linear holding a lowc-packed weight.

    By default forward decodes through `kernels/reference.py`. After `use_fast_kernel()` (what `lowc.load` does on
    CUDA) a dense INT2..INT8 module keeps its weight only in the Triton GEMMs' layout (no second copy, no dense
    bf16 weight; INT2/INT3 codes widened to the INT4 layout, exact, 4 bits a weight) and computes fp16/bf16 inputs
    (rotated first when the scheme says so) through `wa16_gemm` (A16) or `wa8_gemm` (A8/A6, after dividing by the
    `smooth` factors); a V:N:M module moves its weight into the
    sparse-tensor-core layout of `vnm_spmm` (its canonical tensors go to host memory, for `packed()`), and computes
    prefills of `DENSE_PREFILL_TOKENS` or more tokens by expanding that layout into a transient dense weight
    (`vnm_dense`): 16-bit for cuBLAS, INT8 codes for the W8A8 GEMM; float32 inputs still take the reference path.
    """

    def __init__(self, scheme: ModuleScheme, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.scheme = scheme
        self.in_features = scheme.shape[1]
        self.out_features = scheme.shape[0]
        self.kernel = "reference"
        self._k_pad = None  # set when the weight lives in the Triton layout (buffers lowbit_codes/high/scales)
        self._lowbit_bits = None  # that layout's code width: the scheme's, or 4 for widened INT2/INT3 codes
        for suffix, t in tensors.items():
            self.register_buffer(suffix, t)

    def use_fast_kernel(self, dtype: torch.dtype | None = None) -> bool:
        """Move the weight into its GPU kernel's layout when the scheme allows it; returns whether it did. `dtype`
        is the 16-bit dtype the model computes in (V:N:M weights with 16-bit values are laid out in it; default
        the scheme's)."""
        name = fast_kernel_name(self.scheme)
        if self.kernel != "reference" or name is None:
            return self.kernel != "reference"
        if name.startswith("vnm"):
            return self._use_vnm_kernel(name, dtype or getattr(torch, self.scheme.dtype))
        from ..kernels.lowbit_layout import to_lowbit_layout

        bits, qweight = self.scheme.bits, self.qweight
        if layout_bits(bits) != bits:  # INT2/INT3 codes are INT4 codes too: the INT4 layout computes them exactly
            codes = unpack_int(qweight, bits, self.in_features)
            bits = layout_bits(bits)
            qweight = pack_int(codes, bits)
        w = to_lowbit_layout(qweight, self.scales, bits, self.scheme.group, self.scheme.shape[1])
        del self.qweight, self.scales  # the kernel layout holds the same codes and scales (see packed())
        self.register_buffer("lowbit_codes", w.codes)
        self.register_buffer("lowbit_high", w.high)
        self.register_buffer("lowbit_scales", w.scales)
        self._k_pad, self._lowbit_bits = w.k_pad, bits
        self.kernel = name
        return True

    def _use_vnm_kernel(self, name: str, dtype: torch.dtype) -> bool:
        from ..kernels import vnm_layout
        from ..kernels.cuda_build import available

        if dtype not in (torch.float16, torch.bfloat16) or not available():
            return False
        spec, shape = self.scheme.vnm, self.scheme.shape
        canonical = {suffix: getattr(self, suffix) for suffix in self.scheme.expected_tensors()}
        columns, positions = canonical["columns"], canonical["positions"]
        if name == "vnm_int8":
            codes = unpack_int(canonical["qweight"], self.scheme.bits, self.scheme.stored_columns)
            scales = canonical["scales"].float()
            w = vnm_layout.to_vnm_int8_layout(codes, scales, columns, positions, spec.v, spec.m, shape,
                                              group=None if scales.shape[1] == 1 else self.scheme.group)
            tensors = dict(vnm_values=w.values, vnm_meta=w.meta, vnm_columns=w.columns, vnm_scales=w.scales)
        else:
            if self.scheme.bits is None:
                values = canonical["values"]
            else:  # 16-bit inputs: the integer values dequantized once, as the reference computes them
                values = reference.dequantize_int(canonical["qweight"], canonical["scales"], self.scheme.bits,
                                                  self.scheme.group, self.scheme.stored_columns)
            w = vnm_layout.to_vnm_kernel_layout(values, columns, positions, spec.v, spec.m, shape, dtype=dtype)
            tensors = dict(vnm_values=w.values, vnm_meta=w.meta, vnm_columns=w.columns)
        # the weight's canonical tensors move to host memory (bias, smooth stay as they are)
        self._canonical = {suffix: canonical[suffix].cpu() for suffix in VNM_WEIGHT_TENSORS if suffix in canonical}
        for suffix in self._canonical:
            delattr(self, suffix)
        for suffix, t in tensors.items():
            self.register_buffer(suffix, t)
        self._vnm_layout = (w.kb, w.kb_pad, getattr(w, "meta_mode", None), getattr(w, "group_pairs", 0))
        self.kernel = name
        return True

    @property
    def vnm_weight(self):
        """The weight in `vnm_spmm`'s layout (a VNMKernelWeight or VNMInt8Weight over this module's buffers), or
        None."""
        if not self.kernel.startswith("vnm"):
            return None
        from ..kernels.vnm_layout import VNMInt8Weight, VNMKernelWeight

        spec, (rows, cols) = self.scheme.vnm, self.scheme.shape
        kb, kb_pad, meta_mode, group_pairs = self._vnm_layout
        if self.kernel == "vnm_int8":
            return VNMInt8Weight(spec.v, spec.m, rows, cols, kb, kb_pad, self.vnm_columns, self.vnm_values,
                                 self.vnm_meta, self.vnm_scales, meta_mode, group_pairs)
        return VNMKernelWeight(spec.v, spec.m, rows, cols, kb, kb_pad, self.vnm_columns, self.vnm_values,
                               self.vnm_meta)

    @property
    def lowbit(self):
        """The weight in the Triton GEMM layout (a `LowbitWeight` view of this module's buffers), or None."""
        if self._k_pad is None:
            return None
        from ..kernels.lowbit_layout import LowbitWeight

        n, k = self.scheme.shape
        return LowbitWeight(self._lowbit_bits, self.scheme.group, n, k, self._k_pad, self.lowbit_codes,
                            self.lowbit_high, self.lowbit_scales)

    def packed(self) -> dict[str, torch.Tensor]:
        """The canonical artifact tensors of this module (rebuilt exactly from the kernel layout when it has one)."""
        if self.kernel.startswith("vnm"):
            device = self.vnm_values.device
            return {suffix: self._canonical[suffix].to(device) if suffix in self._canonical else getattr(self, suffix)
                    for suffix in self.scheme.expected_tensors()}
        if self._k_pad is None:
            return {suffix: getattr(self, suffix) for suffix in self.scheme.expected_tensors()}
        from ..kernels.lowbit_layout import from_lowbit_layout

        out = {suffix: getattr(self, suffix) for suffix in self.scheme.expected_tensors()
               if suffix not in ("qweight", "scales")}
        out["qweight"], out["scales"] = from_lowbit_layout(self.lowbit)
        if self._lowbit_bits != self.scheme.bits:  # widened codes back to the scheme's packing
            out["qweight"] = pack_int(unpack_int(out["qweight"], self._lowbit_bits, self.in_features),
                                      self.scheme.bits)
        return out

    def dense_weight(self) -> torch.Tensor:
        """The float32 weight this module computes with (for inspection and tests; not used in forward): W R, the
        weight of the rotated inputs, when the scheme rotates them."""
        return reference.dense_weight(self.packed(), self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel.startswith("vnm") and x.dtype in (torch.float16, torch.bfloat16):
            bias = getattr(self, "bias", None)
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            from ..kernels import vnm_dense, vnm_spmm

            weight = self.vnm_weight
            prefill = x.numel() >= vnm_dense.DENSE_PREFILL_TOKENS * self.in_features  # expand, then a dense GEMM
            if self.kernel == "vnm" and x.dtype == self.vnm_values.dtype:
                if prefill:
                    return vnm_dense.vnm_dense_linear(x, weight, bias)
                return vnm_spmm.vnm_spmm(x, weight, bias)
            if self.kernel == "vnm_int8":
                if self.scheme.smooth:
                    x = (x.float() / self.smooth).to(x.dtype)
                if prefill and vnm_dense.dense_int8_group(weight) is not None:
                    from ..kernels.wa8_gemm import wa8_gemm

                    return wa8_gemm(x, vnm_dense.vnm_int8_lowbit(weight), bias, act_bits=self.scheme.abits)
                return vnm_spmm.vnm_spmm_int8(x, weight, bias, act_bits=self.scheme.abits)
        if self._k_pad is not None and x.dtype in (torch.float16, torch.bfloat16):
            if self.scheme.rotate:
                x = rotate_inputs(x, self.scheme.rotate)
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
