"""A compression recipe: what to do to which modules. Loaded from YAML/JSON or built from CLI flags."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .compress.sparsity.vnm import VNMSpec
from .errors import UsageError
from .kernels.hadamard import rotation_block
from .kernels.packing import SUPPORTED_BITS
from .scheme import ACTIVATION_BITS, ModuleScheme

from .compress.sparsity.importance import METHODS as IMPORTANCE_METHODS, NEEDS_CALIBRATION
RECONSTRUCT_SOLVERS = ("lstsq", "obs")
WEIGHT_METHODS = ("rtn", "gptq", "awq")
DENSE_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class Recipe:
    """What `lowc compress` does.

    vnm: a V:N:M pattern such as "64:2:5" (None keeps weights dense). wbits: 8, 6, 4, or 3 / 2 (for the arbitrary-bit
    path) for symmetric integer weights per output channel per `group` input columns (None keeps floats). skip: fnmatch patterns of module
    names that stay dense, on top of the architecture's defaults (embeddings, lm_head). dense_dtype: the dtype of
    every tensor stored as floats (embeddings, norms, skipped layers, unquantized V:N:M values); "auto" keeps the
    checkpoint's. importance: magnitude, wanda or ria (the latter two need `calib`, a text file, of which
    `calib_samples` windows of `calib_seqlen` tokens are used; seqlen defaults to min(2048, max positions)).
    permute: reorder channels before V:N:M pruning so more importance survives (folded into neighbouring layers, so
    the model's function is unchanged); `permute_iterations` alternating rounds of the search. reconstruct: refit the
    kept weights of every pruned layer to its dense outputs on the calibration text, layer by layer ("lstsq": exact
    least squares per row; "obs": SparseGPT's faster sequential update); None prunes without refitting. method: how
    weights are rounded: "rtn" (round to nearest), "gptq" (rounding errors compensated through the calibration
    Hessian, jointly with V:N:M pruning; needs `calib`; `act_order` rounds high-energy input channels first; `clip`
    shrinks each dense group's scale where that lowers the group's output error under the Hessian) or "awq"
    (activation-aware per-channel scales folded into the previous op, clipped round to nearest). smooth: SmoothQuant
    factors that move activation outliers into the weights before A8/A6 quantization (folded the same way).
    `scale_alpha` fixes the strength of smooth/awq factors; by default it is searched per layer group. abits: 8 or 6
    for per-token symmetric quantization of the inputs of every integer-weight Linear (16 or None keeps them
    16-bit); with abits 6, `a8_budget` (a fraction of the quantized Linears' FLOPs) keeps A8 on the layers most
    sensitive to A6, measured on `calib` (FlexQ). rotate: rotate the inputs of every integer-weight Linear by a block
    Hadamard transform (blocks of up to 128 channels; the weights are rotated to match and the inputs online at run
    time), which spreads activation and weight outliers before rounding (QuaRot); dense weights only, and instead of
    smooth/awq. tune_steps: after rounding, train what the artifact stores as floats (every group scale, the
    Linears' biases, the norms) for this many Adam steps so that the quantized model's outputs follow the float
    model's on `calib`, the integer codes fixed (EfficientQAT's E2E-QP; 0 = off); `tune_lr` is the step size of the
    scales' log-factors (biases and norms take a tenth). Dense integer weights only. ast: AST recovery training
    after V:N:M pruning, a mapping of `ASTConfig` fields (`{"steps": 500, "slorb": True}`; docs/AST.md); trains on
    `calib`.
    """

    vnm: str | None = None
    wbits: int | None = None
    group: int = 128
    skip: list[str] = field(default_factory=list)
    importance: str = "magnitude"
    dense_dtype: str = "auto"
    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int | None = None
    sparsity: float | None = None
    pad_rows: bool = False
    permute: bool = True
    permute_iterations: int = 2
    reconstruct: str | None = None
    method: str = "rtn"
    abits: int | None = None
    a8_budget: float | None = None
    act_order: bool = False
    clip: bool = False
    smooth: bool = False
    scale_alpha: float | None = None
    rotate: bool = False
    tune_steps: int = 0
    tune_lr: float = 1e-3
    ast: dict | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def vnm_auto(self) -> bool:
        return self.vnm == "auto"

    @property
    def vnm_spec(self) -> VNMSpec | None:
        """The fixed V:N:M pattern (None without sparsity or with `vnm: auto`, which is chosen per layer type)."""
        return None if self.vnm is None or self.vnm_auto else VNMSpec.parse(self.vnm)

    @property
    def auto_m(self) -> int:
        from .compress.sparsity.select import m_for_sparsity

        return m_for_sparsity(self.sparsity)

    def validate(self) -> None:
        if self.vnm == "auto":
            if self.sparsity is None:
                raise UsageError("--vnm auto: give --sparsity S (fraction of weights pruned, 0.5 to 0.875)")
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
                raise UsageError(f"--sparsity: expected a number, got {self.sparsity!r}")
            self.sparsity = float(self.sparsity)
            self.auto_m  # validates the range
        elif self.vnm is not None:
            self.vnm = str(VNMSpec.parse(str(self.vnm), flag="--vnm"))
            if self.sparsity is not None:
                raise UsageError("--sparsity goes with --vnm auto; a fixed V:N:M pattern sets the sparsity itself")
        elif self.sparsity is not None:
            raise UsageError("--sparsity goes with --vnm auto")
        if self.wbits is not None:
            if isinstance(self.wbits, bool) or not isinstance(self.wbits, int) or self.wbits not in SUPPORTED_BITS:
                raise UsageError(f"--wbits: expected one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.wbits!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 16 or self.group % 16:
            raise UsageError(f"--group: expected a positive multiple of 16 (e.g. 64, 128), got {self.group!r}")
        if isinstance(self.skip, str):
            self.skip = [self.skip]
        if not isinstance(self.skip, list) or not all(isinstance(s, str) for s in self.skip):
            raise UsageError(f"--skip: expected module-name patterns, got {self.skip!r}")
        if self.importance not in IMPORTANCE_METHODS:
            raise UsageError(f"--importance: expected one of {', '.join(IMPORTANCE_METHODS)}, got {self.importance!r}")
        if self.importance != "magnitude" and self.vnm is None:
            raise UsageError(f"--importance {self.importance}: importance scores choose what --vnm prunes; give --vnm too")
        if self.importance in NEEDS_CALIBRATION and not self.calib:
            raise UsageError(f"--importance {self.importance}: needs calibration text, give --calib FILE")
        if self.calib is not None:
            self.calib = str(self.calib)
        for name, value in (("--calib-samples", self.calib_samples), ("--calib-seqlen", self.calib_seqlen)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.pad_rows, bool):
            raise UsageError(f"--pad-rows: expected true or false, got {self.pad_rows!r}")
        if self.reconstruct is not None:
            if self.reconstruct not in RECONSTRUCT_SOLVERS:
                raise UsageError(f"--reconstruct: expected one of {', '.join(RECONSTRUCT_SOLVERS)}, got {self.reconstruct!r}")
            if self.vnm is None:
                raise UsageError(f"--reconstruct {self.reconstruct}: refits pruned weights; give --vnm too")
            if not self.calib:
                raise UsageError(f"--reconstruct {self.reconstruct}: needs calibration text, give --calib FILE")
        if self.method not in WEIGHT_METHODS:
            raise UsageError(f"--method: expected one of {', '.join(WEIGHT_METHODS)}, got {self.method!r}")
        if self.method == "gptq":
            if self.wbits is None:
                raise UsageError("--method gptq: rounds integer weights; give --wbits too")
            if not self.calib:
                raise UsageError("--method gptq: needs calibration text, give --calib FILE")
        if not isinstance(self.act_order, bool):
            raise UsageError(f"--act-order: expected true or false, got {self.act_order!r}")
        if self.act_order and self.method != "gptq":
            raise UsageError("--act-order: orders GPTQ's column walk; give --method gptq")
        if not isinstance(self.clip, bool):
            raise UsageError(f"--clip: expected true or false, got {self.clip!r}")
        if self.clip and self.method != "gptq":
            raise UsageError("--clip: searches GPTQ's group scales (AWQ always clips); give --method gptq")
        if self.method == "awq":
            if self.wbits is None:
                raise UsageError("--method awq: scales integer weights; give --wbits too")
            if not self.calib:
                raise UsageError("--method awq: needs calibration text, give --calib FILE")
        if self.abits == 16:
            self.abits = None
        if self.abits is not None:
            if self.abits not in ACTIVATION_BITS or isinstance(self.abits, bool):
                raise UsageError(f"--abits: expected 6, 8 or 16, got {self.abits!r}")
            if self.wbits is None:
                raise UsageError(f"--abits {self.abits}: activations are quantized for integer-weight GEMMs; give --wbits")
        if self.a8_budget is not None:
            if self.abits != 6:
                raise UsageError("--a8-budget: goes with --abits 6 (it chooses the layers kept at A8)")
            if isinstance(self.a8_budget, bool) or not isinstance(self.a8_budget, (int, float)) \
                    or not 0 <= self.a8_budget <= 1:
                raise UsageError(f"--a8-budget: expected a fraction of FLOPs from 0 to 1, got {self.a8_budget!r}")
            if not self.calib:
                raise UsageError("--a8-budget: layer sensitivity is measured on calibration text, give --calib FILE")
            self.a8_budget = float(self.a8_budget)
        if not isinstance(self.smooth, bool):
            raise UsageError(f"--smooth: expected true or false, got {self.smooth!r}")
        if self.smooth:
            if self.abits is None:
                raise UsageError("--smooth: moves activation outliers into the weights for --abits 6 or 8; give --abits")
            if self.method == "awq":
                raise UsageError("--smooth and --method awq both choose per-channel scales; use one of them")
            if not self.calib:
                raise UsageError("--smooth: needs calibration text, give --calib FILE")
        if self.scale_alpha is not None:
            if self.scaling is None:
                raise UsageError("--scale-alpha: sets the strength of --smooth or --method awq; give one of them")
            if isinstance(self.scale_alpha, bool) or not isinstance(self.scale_alpha, (int, float)) \
                    or not 0 < self.scale_alpha < 1:
                raise UsageError(f"--scale-alpha: expected a number between 0 and 1, got {self.scale_alpha!r}")
            self.scale_alpha = float(self.scale_alpha)
        if not isinstance(self.rotate, bool):
            raise UsageError(f"--rotate: expected true or false, got {self.rotate!r}")
        if self.rotate:
            if self.wbits is None:
                raise UsageError("--rotate: rotates the inputs of integer-weight Linears; give --wbits")
            if self.vnm is not None:
                raise UsageError("--rotate: a rotation mixes the input channels that V:N:M pruning keeps or drops; "
                                 "use it without --vnm")
            if self.scaling is not None:
                raise UsageError(f"--rotate and {'--smooth' if self.smooth else '--method awq'} both treat outlier "
                                 "channels (per-channel factors would act on unrotated channels); use one of them")
        if isinstance(self.tune_steps, bool) or not isinstance(self.tune_steps, int) or self.tune_steps < 0:
            raise UsageError(f"--tune-steps: expected a non-negative integer, got {self.tune_steps!r}")
        if isinstance(self.tune_lr, bool) or not isinstance(self.tune_lr, (int, float)) \
                or not 0 < self.tune_lr <= 0.1:
            raise UsageError(f"--tune-lr: expected a step size above 0 and at most 0.1, got {self.tune_lr!r}")
        self.tune_lr = float(self.tune_lr)
        if self.tune_steps:
            if self.wbits is None:
                raise UsageError("--tune-steps: tunes the scales of integer weights; give --wbits")
            if self.vnm is not None:
                raise UsageError("--tune-steps: tunes dense integer weights; use it without --vnm (AST trains "
                                 "V:N:M models, docs/AST.md)")
            if not self.calib:
                raise UsageError("--tune-steps: trains on calibration text, give --calib FILE")
        if not isinstance(self.permute, bool):
            raise UsageError(f"--permute: expected true or false, got {self.permute!r}")
        if isinstance(self.permute_iterations, bool) or not isinstance(self.permute_iterations, int) \
                or not 1 <= self.permute_iterations <= 20:
            raise UsageError(f"--permute-iterations: expected an integer from 1 to 20, got {self.permute_iterations!r}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise UsageError(f"--dense-dtype: expected one of {', '.join(DENSE_DTYPES)}, got {self.dense_dtype!r}")
        if self.ast is not None:
            from .compress.sparsity.ast_cli import validate_ast_recipe

            self.ast = dict(validate_ast_recipe(self.ast, self.vnm, self.calib))
            if self.method == "awq":
                raise UsageError("--ast-steps with --method awq: AWQ's clipped scales are searched on the weights "
                                 "before AST changes them; use --method gptq or rtn with AST")

    @property
    def scaling(self) -> str | None:
        """Which per-channel scaling compress searches and folds: "smooth", "awq" or None."""
        return "smooth" if self.smooth else "awq" if self.method == "awq" else None

    @property
    def needs_calibration(self) -> bool:
        return (self.method in ("gptq", "awq") or self.smooth or self.a8_budget is not None or self.ast is not None
                or self.tune_steps > 0
                or (self.vnm is not None and (self.importance in NEEDS_CALIBRATION or self.reconstruct is not None)))

    @property
    def refits(self) -> bool:
        """Whether compress walks the model layer by layer to refit (`reconstruct`) or round (`gptq`) weights."""
        return self.method == "gptq" or (self.vnm is not None and self.reconstruct is not None)

    @property
    def permutes(self) -> bool:
        """Whether compress runs the V:N:M channel permutation search."""
        return self.vnm is not None and self.permute

    @property
    def is_noop(self) -> bool:
        return self.vnm is None and self.wbits is None

    def to_dict(self) -> dict:
        return asdict(self)  # deep copies: `ast` is a new dict

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise UsageError(f"{where}: expected a mapping of recipe options, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        """Read a recipe from YAML (.yaml/.yml) or JSON."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"--recipe: no such file {path}")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # yaml/json parse errors carry line info in their message
            raise UsageError(f"--recipe: {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data or {}, where=f"--recipe {path}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def scheme_for(self, name: str, shape: tuple[int, int], dtype: str, bias: bool,
                   keep_dense: tuple[str, ...] = (), vnm: VNMSpec | None = None) -> ModuleScheme | None:
        """The scheme for one Linear module, or None when it stays as it is; `vnm` overrides the recipe's pattern."""
        if self.is_noop or any(fnmatch.fnmatchcase(name, p) for p in (*keep_dense, *self.skip)):
            return None
        return ModuleScheme(name=name, shape=shape, vnm=vnm or self.vnm_spec, bits=self.wbits, group=self.group,
                            dtype=dtype, bias=bias, abits=self.abits,
                            rotate=rotation_block(shape[1]) if self.rotate else None)
