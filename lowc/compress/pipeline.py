"""`lowc.compress`: read a checkpoint, apply a recipe module by module, write a verified artifact."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifact import ArtifactWriter, check_output_dir, producer_info
from ..checkpoint import Checkpoint
from ..console import progress_bar
from ..errors import CheckpointError, UsageError
from ..kernels.hadamard import rotate_inputs, rotate_weight
from ..kernels.packing import pack_2bit, pack_int
from ..kernels.reference import dense_weight, group_sums
from ..models import build_model
from ..recipe import Recipe
from ..scheme import ModuleScheme
from .calibration import calibration_ids, input_norms
from .obs import SOLVERS
from .quant.flexq import activation_sensitivity, choose_a8
from .quant.gptq import codes_for_scales, gptq_quantize
from .quant.rtn import quantize_rtn
from .quant.scaling import scale_model
from .quant.tune import TuneConfig, frozen_copy, tune_quantized
from .sparsity.importance import NEEDS_CALIBRATION, importance_scores
from .sparsity.permute import PermutationReport, permute_model
from .sparsity.select import layer_type, select_vnm
from .reconstruct import reconstruct_layers
from .sparsity.vnm import VNMSpec, keep_mask, kept_column_index, vnm_compress, vnm_mask

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
AST_LOG = "ast_log.jsonl"  # AST's per-step log, copied into the artifact
STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
log = logging.getLogger("lowc.compress")


@dataclass
class Plan:
    """What compress will do: the scheme of every compressed module plus the tensors kept as they are."""

    schemes: dict[str, ModuleScheme]
    dense: dict[str, tuple[tuple[int, ...], int]]  # name -> (shape, bytes as stored)
    bf16_bytes: int

    @property
    def packed_bytes(self) -> int:
        return sum(s.nbytes() for s in self.schemes.values()) + sum(b for _, b in self.dense.values())


def _stored_bytes(ckpt: Checkpoint, name: str, recipe: Recipe) -> int:
    """Bytes per element of a tensor kept as it is (floats converted to the recipe's dense_dtype)."""
    dt = ckpt.safetensors_dtype(name)
    if dt in ("BF16", "F16", "F32", "F64") and recipe.dense_dtype != "auto":
        return 4 if recipe.dense_dtype == "float32" else 2
    return {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}.get(dt, 4)


def _as_dense_dtype(t: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    return t.to(TORCH_DTYPES[recipe.dense_dtype]) if t.is_floating_point() and recipe.dense_dtype != "auto" else t


def make_plan(ckpt: Checkpoint, recipe: Recipe, vnm_by_type: dict[str, VNMSpec] | None = None) -> Plan:
    """Decide every Linear's scheme from the recipe; shapes come from the checkpoint and are checked against the config.

    With `vnm: auto`, `vnm_by_type` (from `select_vnm`) gives the pattern of each layer type; without it the plan uses
    V=16 and the recipe's M, the candidate set the selection starts from.
    """
    with torch.device("meta"):
        model = build_model(ckpt.config)
    dtype = ckpt.dtype() if recipe.dense_dtype == "auto" else recipe.dense_dtype
    slorb_group = None
    if recipe.ast is not None:
        from .sparsity.ast import ASTConfig

        config = ASTConfig(**recipe.ast)
        slorb_group = config.slorb_group if config.slorb else None
    schemes: dict[str, ModuleScheme] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or f"{name}.weight" not in ckpt.weight_map:
            continue
        shape = ckpt.shape(f"{name}.weight")
        if tuple(shape) != (module.out_features, module.in_features):
            raise CheckpointError(f"{ckpt.path}: tensor '{name}.weight' is {list(shape)}, config.json implies "
                                  f"{[module.out_features, module.in_features]}")
        vnm = None
        if recipe.vnm_auto:
            vnm = (vnm_by_type or {}).get(layer_type(name), VNMSpec(16, 2, recipe.auto_m))
        scheme = recipe.scheme_for(name, (shape[0], shape[1]), dtype, module.bias is not None,
                                   keep_dense=ckpt.architecture.keep_dense, vnm=vnm)
        if scheme is not None and scheme.vnm is not None and slorb_group is not None:
            scheme = dataclasses.replace(scheme, slorb_group=slorb_group)  # AST trains a SLoRB branch for it
        if scheme is not None and scheme.vnm is not None and shape[0] % scheme.vnm.v and not recipe.pad_rows:
            raise UsageError(f"--vnm {scheme.vnm}: {name} has {shape[0]} rows, not a multiple of V={scheme.vnm.v}; "
                             "choose a V that divides it or pass --pad-rows to pad with zero rows")
        if scheme is not None:
            schemes[name] = scheme
    owned = {f"{m}.{s}" for m in schemes for s in ("weight", "bias")}
    dense = {n: (ckpt.shape(n), math.prod(ckpt.shape(n)) * _stored_bytes(ckpt, n, recipe))
             for n in ckpt.keys() if n not in owned}
    for m, s in schemes.items():  # a compressed module's bias is stored with it
        if s.bias:
            dense.pop(f"{m}.bias", None)
    return Plan(schemes, dense, ckpt.nbytes_bf16())


def compress_module(weight: torch.Tensor, scheme: ModuleScheme, importance: torch.Tensor | None = None,
                    scales: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Pack one Linear weight [R, K] into the tensors its scheme stores (without bias).

    `importance` [R, K] decides what V:N:M pruning keeps (default: magnitude). `scales` (fp16 [R, groups]) are
    quantization scales chosen beforehand (GPTQ); without them round-to-nearest picks its own.
    """
    out: dict[str, torch.Tensor] = {}
    w = weight.float()
    if scheme.vnm is not None:
        vnm = vnm_compress(w, scheme.vnm, importance)
        out["columns"] = vnm["columns"]
        out["positions"] = pack_2bit(vnm["positions"].reshape(w.shape[0], -1))
        w = vnm["values"]
        if scheme.bits is None:
            out["values"] = w.to(TORCH_DTYPES[scheme.dtype])
    if scheme.bits is not None:
        if scales is None:
            codes, scales = quantize_rtn(w, scheme.bits, scheme.group)
        else:
            codes = codes_for_scales(w, scales, scheme.bits, scheme.group)
        out["qweight"] = pack_int(codes, scheme.bits)
        out["scales"] = scales
    return out


def _load_dense(ckpt: Checkpoint) -> torch.nn.Module:
    """The checkpoint as a float32 torch model (for calibration and channel permutation)."""
    from ..runtime.load import load

    return load(ckpt.path)


def _rotation_record(plan: Plan) -> dict:
    """The manifest's record of --rotate: the block per module and the modules left unrotated."""
    return {"kind": "hadamard", "blocks": {m: s.rotate for m, s in plan.schemes.items() if s.rotate},
            "not_rotated": sorted(m for m, s in plan.schemes.items() if not s.rotate)}


def _rotate(model: torch.nn.Module | None, plan: Plan) -> bool:
    """Rotate the weight of every module whose scheme says so (W -> W R, in place) and its inputs in a forward
    pre-hook, so that calibration, GPTQ and FlexQ see the rotated problem the artifact computes. Without a model
    (round to nearest) nothing happens here: each weight is rotated as it is packed. Returns whether the model's
    weights were rotated."""
    record = _rotation_record(plan)
    left = record["not_rotated"]
    if left:
        log.warning("--rotate: %d module(s) keep unrotated inputs (input features without a power-of-two factor "
                    ">= 16): %s", len(left), ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""))
    if model is None:
        return False
    for name, block in record["blocks"].items():
        linear = model.get_submodule(name)
        linear.weight.data = rotate_weight(linear.weight.data, block).to(linear.weight.dtype)
        linear.register_forward_pre_hook(lambda _, args, b=block: (rotate_inputs(args[0], b), *args[1:]))
    return True


def _calibrate(model: torch.nn.Module, ckpt: Checkpoint, recipe: Recipe, plan: Plan,
               progress: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Calibration token windows, plus the input-channel norms of every planned module (measured on the dense model)
    where the importance scores need them."""
    if model.tokenizer is None:
        raise CheckpointError(f"{ckpt.path}: calibration needs the checkpoint's tokenizer.json")
    seqlen = recipe.calib_seqlen or min(2048, model.config.max_position_embeddings)
    if seqlen > model.config.max_position_embeddings:
        raise UsageError(f"--calib-seqlen: {seqlen} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    ids = calibration_ids(model.tokenizer, recipe.calib, recipe.calib_samples, seqlen)
    info = {"file": str(Path(recipe.calib).absolute()), "samples": recipe.calib_samples, "seqlen": seqlen,
            "tokens": int(ids.numel())}
    if recipe.importance not in NEEDS_CALIBRATION:
        return ids, {}, info
    norms = input_norms(model, ids, progress=progress)
    missing = [m for m, s in plan.schemes.items() if s.vnm is not None and m not in norms]
    if missing:
        raise UsageError(f"--importance {recipe.importance}: no calibration statistics for {', '.join(missing[:3])} "
                         "(only Linears inside the decoder/encoder layers are calibrated; --skip them)")
    return ids, norms, info


def _permute(model: torch.nn.Module, scores: dict[str, torch.Tensor], plan: Plan, recipe: Recipe,
             progress: bool) -> PermutationReport:
    """Run the V:N:M channel permutation on the dense model in place; returns the report with permuted scores.

    The search optimises one pattern; with `vnm: auto` and several chosen patterns it uses the one that covers the
    most weights (the others still gain, less precisely).
    """
    weight_of: dict[VNMSpec, int] = {}
    for s in plan.schemes.values():
        if s.vnm is not None:
            weight_of[s.vnm] = weight_of.get(s.vnm, 0) + s.shape[0] * s.shape[1]
    spec = max(weight_of, key=weight_of.get)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"permuting channels for {spec}", total=None)
        report = permute_model(model, scores, spec, iterations=recipe.permute_iterations,
                               on_step=lambda done, total: bar.update(task, completed=done, total=total))
    gain = (report.kept_after / report.kept_before - 1) * 100 if report.kept_before else 0.0
    log.info("channel permutation for %s: %s importance kept %+.2f%% (%d of %d channel groups permuted, %.1f s)",
             spec, recipe.importance, gain, sum(g.applied for g in report.groups), len(report.groups), report.seconds)
    return report


def _reconstruct(model: torch.nn.Module, ids: torch.Tensor, scores: dict[str, torch.Tensor], plan: Plan,
                 recipe: Recipe, progress: bool, refit: bool | None = None,
                 gptq: bool | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Walk the dense model layer by layer: prune each V:N:M Linear by its scores and refit its kept weights
    (`reconstruct`), round with GPTQ (`method: gptq`), or both. Returns (metrics, GPTQ's fp16 scales per module).

    `refit` / `gptq` (default: as the recipe says) run one of the two alone: with AST the refit runs before training
    and GPTQ after it, on the trained weights with AST's final masks (given by `scores`)."""
    scales: dict[str, torch.Tensor] = {}
    refit = bool(recipe.reconstruct) if refit is None else refit
    gptq = recipe.method == "gptq" if gptq is None else gptq
    targets = {m for m, s in plan.schemes.items()
               if (s.vnm is not None and refit) or (s.bits is not None and gptq)}

    def solve(name: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        scheme = plan.schemes[name]
        keep = kept = None
        if scheme.vnm is not None:
            columns, positions = vnm_mask(scores[name], scheme.vnm)
            kept = kept_column_index(columns, positions, scheme.vnm).to(weight.device)
            keep = keep_mask(kept, scheme.shape).to(weight.device)
            if refit:
                weight = SOLVERS[recipe.reconstruct](weight, hessian, keep)
        if scheme.bits is not None and gptq:
            weight, s = gptq_quantize(weight, hessian, scheme.bits, scheme.group, keep, kept,
                                      act_order=recipe.act_order, clip=recipe.clip)
            scales[name] = s.cpu()
        return weight

    errors = reconstruct_layers(model, ids, solve, targets, progress=progress)
    left = sorted(targets - errors.keys())
    if left:
        log.info("reconstruction: %d modules outside the decoder/encoder layers are compressed without it (%s)",
                 len(left), ", ".join(left[:3]))
    mean = sum(errors.values()) / max(1, len(errors))
    what = " + ".join(x for x in (refit and f"refit {recipe.reconstruct}", gptq and "GPTQ") if x)
    log.info("reconstruction (%s): mean relative output error on calibration data %.4f over %d modules",
             what, mean, len(errors))
    metrics = {"solver": recipe.reconstruct if refit else None,
               "method": recipe.method if gptq == (recipe.method == "gptq") else None,
               "output_rel_error_mean": mean,
               "output_rel_error": errors, "not_refitted": left}
    return metrics, scales


def _scale(model: torch.nn.Module, ids: torch.Tensor, plan: Plan, recipe: Recipe,
           progress: bool) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SmoothQuant / AWQ: search per-channel factors for every group of quantized Linears and fold them into the
    model in place (AWQ also searches clipped scales for round-to-nearest); factors no op can absorb stay online
    (the modules' schemes get `smooth`). Returns (the per-group choices for the manifest, fp16 scales by module,
    online factors by module)."""
    try:
        result = scale_model(model, ids, recipe.scaling, plan.schemes, recipe.scale_alpha,
                             clip=recipe.method == "awq", progress=progress)
    except ValueError as e:
        flag = "--smooth" if recipe.smooth else "--method awq"
        raise UsageError(f"{flag}: {e}") from None
    groups = result.groups
    for module in result.online:
        plan.schemes[module] = dataclasses.replace(plan.schemes[module], smooth=True)
    before = sum(g["error_before"] for g in groups.values())
    after = sum(g["error_after"] for g in groups.values())
    scaled = sum(g["alpha"] is not None for g in groups.values())
    log.info("%s: factors chosen for %d of %d groups (%d modules divide their inputs online); quantized calibration "
             "error %.4g -> %.4g (sum over groups)", recipe.scaling, scaled, len(groups), len(result.online),
             before, after)
    return {"kind": recipe.scaling, "alpha": recipe.scale_alpha if recipe.scale_alpha is not None else "searched",
            "groups": groups}, result.clipped, result.online


def _choose_activation_bits(model: torch.nn.Module, ids: torch.Tensor, plan: Plan, recipe: Recipe,
                            progress: bool) -> dict:
    """FlexQ: measure every A6 module's sensitivity and move the most sensitive ones to A8 within the FLOP budget
    (updates `plan` in place); returns the choice and the measurements for the manifest."""
    quantized = {m for m, s in plan.schemes.items() if s.abits == 6}
    sensitivity = activation_sensitivity(model, ids, quantized, progress=progress)
    flops = {m: plan.schemes[m].shape[0] * plan.schemes[m].shape[1] for m in sensitivity}
    chosen = choose_a8(sensitivity, flops, recipe.a8_budget)
    for m in chosen:
        plan.schemes[m] = dataclasses.replace(plan.schemes[m], abits=8)
    total = sum(plan.schemes[m].shape[0] * plan.schemes[m].shape[1] for m in quantized)
    fraction = sum(flops[m] for m in chosen) / max(1, total)
    ranking = sorted(sensitivity, key=lambda n: sensitivity[n][6], reverse=True)
    log.info("activation sensitivity (relative output error at A6 / A8), most sensitive first:")
    for m in ranking[:12]:
        log.info("  %-40s %.4f / %.4f%s", m, sensitivity[m][6], sensitivity[m][8], "  -> A8" if m in chosen else "")
    log.info("A8 kept on %d of %d modules (%.1f%% of their FLOPs; budget %.0f%%)", len(chosen), len(quantized),
             100 * fraction, 100 * recipe.a8_budget)
    return {"budget": recipe.a8_budget, "a8_flops_fraction": fraction, "a8": chosen,
            "not_measured": sorted(quantized - sensitivity.keys()),
            "sensitivity": {m: {"a6": sensitivity[m][6], "a8": sensitivity[m][8]} for m in ranking}}


def _start_distributed(recipe: Recipe, device: torch.device) -> tuple[torch.device, bool]:
    """Under torchrun (WORLD_SIZE > 1) with AST: join the process group (NCCL on GPUs, gloo on CPU) so that AST
    trains with FSDP2; every rank calibrates on its own GPU (LOCAL_RANK). Returns (device, whether we joined)."""
    import torch.distributed as dist

    if recipe.ast is None or int(os.environ.get("WORLD_SIZE", "1")) < 2 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def _leave_distributed(joined: bool, barrier: bool = False) -> None:
    """Leave the process group `_start_distributed` joined (no-op otherwise, or when already left). The FSDP2-sharded
    modules are collected first (they hold references into the group), so none outlives it."""
    import gc

    import torch.distributed as dist

    if joined and dist.is_initialized():
        gc.collect()
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _train_ast(model: torch.nn.Module, ckpt: Checkpoint, recipe: Recipe, plan: Plan, scores: dict[str, torch.Tensor],
               calibration: dict, out: Path, progress: bool, resume: bool, device: torch.device
               ) -> tuple[torch.nn.Module | None, dict, dict[str, torch.Tensor]]:
    """AST recovery training of the pruned model in place (docs/AST.md), with the checkpoint's dense model as the
    teacher, on every window of the calibration file. Updates `scores` so that packing keeps exactly AST's final
    masks (`make_plan` gave every V:N:M module its SLoRB group when AST trains branches). Returns (the trained model
    in CPU memory, or None on torchrun ranks other than 0; the manifest's `ast` metrics; SLoRB tensors by module in
    their stored dtype)."""
    from .sparsity.ast import ASTConfig
    from .sparsity.ast_cli import ast_from_pipeline, ast_workdir, training_ids

    t0 = time.perf_counter()
    config = ASTConfig(**recipe.ast)
    teacher = _load_dense(ckpt) if config.distill else None
    train_ids = training_ids(model.tokenizer, recipe.calib, calibration["seqlen"])
    model, metrics, extra, new_scores = ast_from_pipeline(
        model, teacher, plan, train_ids, recipe.ast, ast_workdir(out), progress=progress, scores=scores,
        resume=resume, device=device)
    del teacher
    if model is None:
        return None, metrics, {}
    model.to("cpu")
    scores.update(new_scores)
    slorb = {key[: -len(".slorb.weight")]: t for key, t in extra.items()}
    planned = {m for m, s in plan.schemes.items() if s.slorb_group is not None}
    if set(slorb) != planned:
        raise RuntimeError(f"AST returned SLoRB branches for {len(slorb)} modules, the plan has {len(planned)}")
    slorb = {m: t.to(TORCH_DTYPES[plan.schemes[m].dtype]) for m, t in slorb.items()}
    metrics.update({"log": AST_LOG, "train_windows": int(train_ids.shape[0]),
                    "train_seqlen": int(config.seqlen or train_ids.shape[1]),
                    "seconds": round(time.perf_counter() - t0, 3)})
    return model, metrics, slorb


@contextlib.contextmanager
def _slorb_branches(model: torch.nn.Module, slorb: dict[str, torch.Tensor], plan: Plan):
    """While calibration walks the trained model after AST, every Linear with a SLoRB branch adds it to its output
    (as the runtime will), so later layers see the activations of the model that is written."""
    handles = []
    for module, weight in slorb.items():
        group = plan.schemes[module].slorb_group

        def hook(m, args, y, weight=weight, group=group):
            x = args[0]
            return y + torch.nn.functional.linear(group_sums(x.float(), group), weight.to(x.device).float()).to(y.dtype)
        handles.append(model.get_submodule(module).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _quantization_config(recipe: Recipe, plan: Plan) -> dict:
    specs = {s.vnm for s in plan.schemes.values() if s.vnm is not None}
    spec = next(iter(specs)) if len(specs) == 1 else None
    return {
        "quant_method": "lowc",
        "format_version": "1.0",
        "bits": recipe.wbits,
        "group_size": recipe.group if recipe.wbits else None,
        "sym": True,
        "method": recipe.method if recipe.wbits else None,
        "act_order": recipe.act_order if recipe.wbits else None,
        "clip": recipe.clip if recipe.wbits else None,
        "scaling": recipe.scaling,
        "rotation": "hadamard" if recipe.rotate else None,
        "tuned_steps": recipe.tune_steps or None,
        "activation_bits": recipe.abits,
        "sparsity": None if not specs else {"format": "vnm", "v": spec.v if spec else "per-module", "n": 2,
                                            "m": spec.m if spec else sorted({s.m for s in specs})},
        "modules_to_not_convert": sorted({n.rsplit(".", 1)[0] for n in plan.dense if n.endswith(".weight")}),
    }


def compress(checkpoint: str | Path, output: str | Path, recipe: Recipe | dict | None = None, *,
             force: bool = False, progress: bool = True, tags: tuple[str, ...] = (),
             device: str | torch.device = "cpu", ast_resume: bool = False, **options) -> Path:
    """Compress a Hugging Face checkpoint directory into a lowc artifact directory and return its path.

    `recipe` (a Recipe or dict) says what to do; keyword options (vnm="64:2:5", wbits=6, group=128, skip=[...],
    ast={"steps": 500}) build or override it. Nothing is written unless the whole artifact is written: the output
    appears atomically. `device` is where calibration computes (a GPU makes GPTQ and scale searches on large models
    fast); the model stays in CPU memory and only the layer being calibrated is moved there.

    With `recipe.ast`, AST trains the pruned model between pruning and quantization (on `device`), keeping
    checkpoints in `<output>.ast/` (removed once the artifact is written); `ast_resume` continues an interrupted
    run from its last checkpoint. Under torchrun AST trains on every rank with FSDP2 and rank 0 writes the
    artifact; the other ranks return `output` once training ends, before it exists.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    if options:
        recipe = Recipe.from_dict({**(recipe.to_dict() if recipe else {}), **options}, where="options")
    recipe = recipe or Recipe()
    if recipe.is_noop:
        raise UsageError("nothing to do: give --vnm and/or --wbits (or a --recipe that sets them)")
    if ast_resume and recipe.ast is None:
        raise UsageError("--ast-resume: continues an AST run; give the same --ast-* options (or recipe) as before")
    out = Path(output).absolute()
    check_output_dir(out, force)
    ckpt = Checkpoint(checkpoint)
    if out == ckpt.path.absolute():
        raise UsageError(f"{out}: the output must not be the input checkpoint")
    plan = make_plan(ckpt, recipe)
    device, joined = _start_distributed(recipe, device)
    try:
        return _compress(ckpt, out, recipe, plan, force, progress, tags, device, ast_resume, joined)
    finally:
        _leave_distributed(joined)


def _compress(ckpt: Checkpoint, out: Path, recipe: Recipe, plan: Plan, force: bool, progress: bool,
              tags: tuple[str, ...], device: torch.device, ast_resume: bool, joined: bool) -> Path:
    from .sparsity.ast_cli import ast_log_path, ast_workdir, finish_ast_workdir

    model = _load_dense(ckpt) if recipe.needs_calibration or recipe.permutes else None
    rotated = recipe.rotate and _rotate(model, plan)
    ids, norms, calibration = (_calibrate(model, ckpt, recipe, plan, progress) if recipe.needs_calibration
                               else (None, {}, None))
    if ids is not None:
        ids = ids.to(device)
    teacher = frozen_copy(model) if recipe.tune_steps else None  # the float model (rotated: the same function)

    def importance(module: str, weight: torch.Tensor) -> torch.Tensor:
        return importance_scores(weight, recipe.importance, norms.get(module))

    sparse = [m for m, s in plan.schemes.items() if s.vnm is not None]
    scores = {m: importance(m, ckpt.get(f"{m}.weight")) for m in sparse} if model is not None or recipe.vnm_auto else {}
    selection = None
    if recipe.vnm_auto:
        vnm_by_type, selection = select_vnm(scores, recipe.auto_m, pad_rows=recipe.pad_rows)
        plan = make_plan(ckpt, recipe, vnm_by_type)
    permutation, reconstruction, modified = None, None, {}
    if recipe.permutes:
        permutation = _permute(model, scores, plan, recipe, progress)
        scores = permutation.importance
    scaling, static_scales, online = _scale(model, ids, plan, recipe, progress) if recipe.scaling else (None, {}, {})
    ast, slorb, gptq_after_ast = None, {}, None
    if recipe.ast is not None:
        # refit (pruning) before training, GPTQ after it on the trained weights and AST's final masks
        if recipe.reconstruct:
            reconstruction, _ = _reconstruct(model, ids, scores, plan, recipe, progress, gptq=False)
        model, ast, slorb = _train_ast(model, ckpt, recipe, plan, scores, calibration, out, progress, ast_resume,
                                       device)
        _leave_distributed(joined, barrier=True)  # all ranks together; nothing after training is distributed
        if model is None:  # a torchrun rank other than 0: rank 0 writes the artifact
            return out
    elif recipe.refits:
        reconstruction, gptq_scales = _reconstruct(model, ids, scores, plan, recipe, progress)
        static_scales.update(gptq_scales)
    with _slorb_branches(model, slorb, plan):  # (no branches without AST)
        if ast is not None and recipe.method == "gptq":
            gptq_after_ast, gptq_scales = _reconstruct(model, ids, scores, plan, recipe, progress, refit=False)
            static_scales.update(gptq_scales)
        activation_bits = (_choose_activation_bits(model, ids, plan, recipe, progress)
                           if recipe.a8_budget is not None else None)
    tuning = None
    if teacher is not None:  # after FlexQ: the Linears it keeps at A8 are tuned with A8 inputs
        tuned_scales, tuning = tune_quantized(model, teacher, ids, plan.schemes, static_scales,
                                              TuneConfig(steps=recipe.tune_steps, lr=recipe.tune_lr), progress)
        static_scales.update(tuned_scales)
        del teacher
    if ((permutation is not None and permutation.permutations) or reconstruction is not None or scaling is not None
            or ast is not None or rotated or tuning is not None):
        modified = model.state_dict()
    # float32 in the artifact: norms that absorbed smoothing factors, and the tuned biases and norms
    scaled = {f"{g}.weight" for g, info in (scaling or {}).get("groups", {}).items()
              if not info.get("online") and modified[f"{g}.weight"].dim() == 1}
    if tuning is not None and tuning["kept"]:
        scaled |= set(tuning["other_parameters"])
    del model

    def source(name: str) -> torch.Tensor:
        """A checkpoint tensor as permuted / refitted / scaled / tuned in memory: compressed weights in float32,
        norms that absorbed scaling factors and tuned biases and norms in float32 too (rounding them back would undo
        part of that work), the rest in the checkpoint's dtype."""
        if name not in modified:
            return ckpt.get(name)
        if name.endswith(".weight") and name[: -len(".weight")] in plan.schemes or name in scaled:
            return modified[name].float()
        return modified[name].to(STORED_DTYPES.get(ckpt.safetensors_dtype(name), modified[name].dtype))

    errors: dict[str, float] = {}
    with ArtifactWriter(out, force=force) as writer, progress_bar(progress) as bar:
        task = bar.add_task("compressing", total=len(ckpt.keys()))
        for name in ckpt.keys():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in plan.schemes:
                scheme = plan.schemes[module]
                weight = source(name)
                if scheme.rotate and not rotated:
                    weight = rotate_weight(weight, scheme.rotate)
                score = None
                if scheme.vnm is not None:
                    score = scores.pop(module) if module in scores else importance(module, weight)
                packed = compress_module(weight, scheme, score, static_scales.pop(module, None))
                if scheme.smooth:
                    packed["smooth"] = online.pop(module)
                if scheme.slorb_group is not None:
                    packed["slorb"] = slorb.pop(module)
                for suffix, t in packed.items():
                    writer.add(f"{module}.{suffix}", t)
                w = weight.float()
                errors[module] = float((dense_weight(packed, scheme) - w).norm() / w.norm().clamp_min(1e-30))
            else:
                writer.add(name, _as_dense_dtype(source(name), recipe))
            bar.advance(task)
        for f in ckpt.tokenizer_files():
            writer.copy_file(f)
        if ast is not None and ast_log_path(ast_workdir(out)) is not None:
            writer.copy_file(ast_log_path(ast_workdir(out)), AST_LOG)
        writer.write_json("config.json", {**ckpt.config, "quantization_config": _quantization_config(recipe, plan)})
        metrics = {
            "bf16_bytes": plan.bf16_bytes,
            "packed_bytes": plan.packed_bytes,
            "ratio_vs_bf16": plan.packed_bytes / plan.bf16_bytes,
            "weight_rel_error_mean": sum(errors.values()) / max(1, len(errors)),
            "weight_rel_error": errors,
        }
        if calibration is not None:
            metrics["calibration"] = calibration
        if selection is not None:
            metrics["vnm_selection"] = selection
        if permutation is not None:
            metrics["permutation"] = permutation.to_dict()
        if reconstruction is not None:
            metrics["reconstruction"] = reconstruction
        if scaling is not None:
            metrics["scaling"] = scaling
        if activation_bits is not None:
            metrics["activation_bits"] = activation_bits
        if recipe.rotate:
            metrics["rotation"] = _rotation_record(plan)
        if tuning is not None:
            metrics["tuning"] = tuning
        if ast is not None:
            metrics["ast"] = ast
        if gptq_after_ast is not None:
            metrics["gptq_after_ast"] = gptq_after_ast
        manifest = {
            "producer": producer_info(),
            "architecture": ckpt.architecture.name,
            "kind": ckpt.kind,
            "config": ckpt.config,
            "source": {"path": str(ckpt.path.absolute()), "dtype": ckpt.dtype(), "bf16_bytes": plan.bf16_bytes},
            "recipe": recipe.to_dict(),
            "modules": {m: s.to_json() for m, s in plan.schemes.items()},
            "metrics": metrics,
            "tags": list(tags),
        }
        path = writer.finish(manifest)
    if ast is not None:
        finish_ast_workdir(ast_workdir(out))  # the artifact holds the log; checkpoints are no longer needed
    return path


__all__ = ["compress", "make_plan", "compress_module", "Plan"]
