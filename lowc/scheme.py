"""How one Linear module is stored in an artifact: its V:N:M pattern, bit width, group and tensor layout."""

from __future__ import annotations

from dataclasses import dataclass

from .compress.sparsity.vnm import VNMSpec
from .errors import ArtifactError, UsageError
from .kernels.hadamard import check_block
from .kernels.packing import SUPPORTED_BITS, packed_columns

ACTIVATION_BITS = (6, 8)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "uint8": 1, "int8": 1, "int32": 4,
               "int64": 8, "bool": 1}


@dataclass(frozen=True)
class ModuleScheme:
    """The storage scheme of one compressed Linear: weight [R, K], optional V:N:M, optional integer bits."""

    name: str
    shape: tuple[int, int]
    vnm: VNMSpec | None = None
    bits: int | None = None
    group: int = 128
    dtype: str = "bfloat16"  # dtype of float tensors kept as floats (V:N:M values without bits, bias)
    bias: bool = False
    abits: int | None = None  # per-token symmetric activation quantization of the inputs (6 or 8); None = 16-bit
    # inputs divided per channel by the stored `smooth` [K] before that quantization: SmoothQuant factors that no
    # preceding op could absorb (the weight already holds W * smooth); only with abits
    smooth: bool = False
    # SLoRB (AST): a dense branch group_sums(x, slorb_group) @ S.T added to the output, S = the stored `slorb`
    # [R, ceil(K / slorb_group)] in `dtype`; None = no branch
    slorb_group: int | None = None
    # inputs rotated by a block Hadamard transform of this many channels before (activation) quantization; the
    # stored weight is W R (kernels/hadamard.py); integer dense weights only; None = not rotated
    rotate: int | None = None

    @property
    def stored_columns(self) -> int:
        """Columns of the matrix that is quantized: K for dense weights, 2*Kp/M kept values for V:N:M."""
        if self.vnm is None:
            return self.shape[1]
        return 2 * (self.vnm.padded_shape(*self.shape)[1] // self.vnm.m)

    @property
    def density(self) -> float:
        return 1.0 if self.vnm is None else self.vnm.density

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Suffix -> (shape, dtype) of every tensor this module stores; the artifact's contract."""
        rows, cols = self.shape
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        c = self.stored_columns
        if self.vnm is not None:
            rp, kp = self.vnm.padded_shape(rows, cols)
            kb = kp // self.vnm.m
            out["columns"] = ((rp // self.vnm.v, kb, 4), "uint8")
            out["positions"] = ((rows, packed_columns(2 * kb, 2)), "uint8")
            if self.bits is None:
                out["values"] = ((rows, c), self.dtype)
        if self.bits is not None:
            out["qweight"] = ((rows, packed_columns(c, self.bits)), "int8" if self.bits == 8 else "uint8")
            out["scales"] = ((rows, -(-c // self.group)), "float16")
        if self.vnm is None and self.bits is None:
            out["weight"] = ((rows, cols), self.dtype)
        if self.bias:
            out["bias"] = ((rows,), self.dtype)
        if self.smooth:
            out["smooth"] = ((cols,), "float32")
        if self.slorb_group is not None:
            out["slorb"] = ((rows, -(-cols // self.slorb_group)), self.dtype)
        return out

    def nbytes(self) -> int:
        total = 0
        for shape, dtype in self.expected_tensors().values():
            n = 1
            for s in shape:
                n *= s
            total += n * DTYPE_BYTES[dtype]
        return total

    def label(self) -> str:
        parts = []
        if self.vnm is not None:
            parts.append(f"V:N:M {self.vnm}")
        if self.bits is not None:
            parts.append(f"W{self.bits}{'' if self.abits is None else f'A{self.abits}'} g{self.group}")
        if self.rotate is not None:
            parts.append(f"Hadamard {self.rotate}")
        if self.slorb_group is not None:
            parts.append(f"SLoRB g{self.slorb_group}")
        return " + ".join(parts) or "dense"

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "vnm": None if self.vnm is None else str(self.vnm),
            "bits": self.bits,
            "group": self.group,
            "dtype": self.dtype,
            "bias": self.bias,
            "abits": self.abits,
            **({"smooth": True} if self.smooth else {}),
            **({"slorb_group": self.slorb_group} if self.slorb_group is not None else {}),
            **({"rotate": self.rotate} if self.rotate is not None else {}),
        }

    @classmethod
    def from_json(cls, name: str, data: object) -> "ModuleScheme":
        """Validate a manifest entry; anything malformed raises ArtifactError naming the module."""
        where = f"lowc.json: module '{name}'"
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected an object")
        shape = data.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**31 for s in shape)):
            raise ArtifactError(f"{where}: 'shape' must be two positive integers, got {shape!r}")
        vnm = None
        if data.get("vnm") is not None:
            try:
                vnm = VNMSpec.parse(data["vnm"], flag=f"{where}: 'vnm'")
            except UsageError as e:
                raise ArtifactError(str(e)) from None
        bits = data.get("bits")
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS):
            raise ArtifactError(f"{where}: 'bits' must be one of {SUPPORTED_BITS} or null, got {bits!r}")
        group = data.get("group", 128)
        if not isinstance(group, int) or isinstance(group, bool) or group < 1 or group > 2**20:
            raise ArtifactError(f"{where}: 'group' must be a positive integer, got {group!r}")
        dtype = data.get("dtype", "bfloat16")
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ArtifactError(f"{where}: 'dtype' must be bfloat16, float16 or float32, got {dtype!r}")
        bias = data.get("bias", False)
        if not isinstance(bias, bool):
            raise ArtifactError(f"{where}: 'bias' must be true or false, got {bias!r}")
        if vnm is None and bits is None:
            raise ArtifactError(f"{where}: a compressed module needs 'vnm' or 'bits'")
        abits = data.get("abits")
        if abits is not None and (abits not in ACTIVATION_BITS or isinstance(abits, bool) or bits is None):
            raise ArtifactError(f"{where}: 'abits' must be one of {ACTIVATION_BITS} (with 'bits') or null, got {abits!r}")
        smooth = data.get("smooth", False)
        if not isinstance(smooth, bool) or (smooth and abits is None):
            raise ArtifactError(f"{where}: 'smooth' must be true (with 'abits') or false, got {smooth!r}")
        slorb_group = data.get("slorb_group")
        if slorb_group is not None and (not isinstance(slorb_group, int) or isinstance(slorb_group, bool)
                                        or not 1 <= slorb_group <= 2**20):
            raise ArtifactError(f"{where}: 'slorb_group' (SLoRB input channels per group) must be a positive "
                                f"integer or absent, got {slorb_group!r}")
        rotate = data.get("rotate")
        if rotate is not None:
            try:
                check_block(rotate, shape[1])
            except ValueError as e:
                raise ArtifactError(f"{where}: 'rotate': {e}") from None
            if bits is None or vnm is not None or smooth:
                raise ArtifactError(f"{where}: 'rotate' goes with dense integer weights without 'smooth'")
        return cls(name, (shape[0], shape[1]), vnm, bits, group, dtype, bias, abits, smooth, slorb_group, rotate)
