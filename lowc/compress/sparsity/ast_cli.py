"""Wiring AST into `lowc compress`: click options, the recipe's `ast` mapping, and the pipeline hook.

The recipe carries AST as one mapping of ASTConfig fields (YAML: `ast: {steps: 500, slorb: true}`); the CLI's
`--ast-*` flags fill the same mapping, so a recipe file and flags combine the usual way (flags win).
`ast_from_pipeline` is what `lowc.compress` calls between pruning (permutation + refit) and quantization.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Callable

import click
import torch

from ...errors import UsageError
from . import ast_dist
from .ast import ASTConfig, run_ast

log = logging.getLogger("lowc.compress")

# (flag, ASTConfig field, click keyword arguments)
AST_OPTIONS: list[tuple[str, str, dict]] = [
    ("--ast-steps", "steps", dict(type=int, help="Recover accuracy after V:N:M pruning with N steps of AST "
                                                 "(distillation from the dense model, adaptive masks); needs --calib.")),
    ("--ast-lr", "lr", dict(type=float, help="AST peak learning rate (default 1e-4; warmup, then cosine).")),
    ("--ast-batch-size", "batch_size", dict(type=int, help="AST windows per step over all GPUs (default 8).")),
    ("--ast-seqlen", "seqlen", dict(type=int, help="AST tokens per window (default: --calib-seqlen).")),
    ("--ast-alpha", "alpha", dict(type=float, help="Weight of the distillation KL vs cross-entropy (default 0.5).")),
    ("--ast-temperature", "temperature", dict(type=float, help="Distillation temperature (default 2).")),
    ("--ast-mask-interval", "mask_interval", dict(type=int, help="Steps between mask recomputations (default 10).")),
    ("--ast-mask-importance", "mask_importance", dict(type=click.Choice(["wanda", "magnitude"]),
                                                      help="How AST re-scores weights for new masks (default wanda).")),
    ("--ast-srste-lambda", "srste_lambda", dict(type=float, help="SR-STE decay on pruned weights after its ramp.")),
    ("--ast-slorb/--no-ast-slorb", "slorb", dict(default=None, help="Train a SLoRB dense branch next to every "
                                                                   "pruned Linear (stored in the artifact, run by "
                                                                   "the runtime).")),
    ("--ast-slorb-group", "slorb_group", dict(type=int, help="Input channels per SLoRB group (default 16).")),
    ("--ast-lora/--no-ast-lora", "lora", dict(default=None, help="Three-staged LoRA instead of full fine-tuning "
                                                                 "(for models too large to train in full).")),
    ("--ast-lora-rank", "lora_rank", dict(type=int, help="LoRA rank (default 16).")),
    ("--ast-checkpoint-every", "checkpoint_every", dict(type=int, help="Steps between AST checkpoints (default 50; "
                                                                       "0: none).")),
    ("--ast-teacher-topk", "teacher_topk", dict(type=int, help="Distil from the teacher's k largest logits only.")),
    ("--ast-teacher-cache/--no-ast-teacher-cache", "teacher_cache",
     dict(default=None, help="Cache the teacher's top-k logits on disk and free the teacher before training.")),
    ("--ast-baseline/--no-ast-baseline", "baseline", dict(default=None, help="Plain masked fine-tuning instead of AST "
                                                                             "(for comparisons).")),
    ("--ast-seed", "seed", dict(type=int, help="Seed of the data order and LoRA initialisation (default 0).")),
]
RESUME_FLAG = "--ast-resume"


def _param_name(flag: str) -> str:
    return flag.split("/")[0].lstrip("-").replace("-", "_")


def add_ast_options(command: Callable) -> Callable:
    """Decorate a click command with every `--ast-*` option plus `--ast-resume`; they arrive as keyword arguments
    named `ast_steps`, `ast_lr`, ... and `ast_resume` (None when not given). Use `ast_options_to_dict(kwargs)`."""
    command = click.option(RESUME_FLAG, "ast_resume", is_flag=True, default=False,
                           help="Continue an interrupted AST run from its last checkpoint (same options).")(command)
    for flag, _, kwargs in reversed(AST_OPTIONS):
        command = click.option(flag, _param_name(flag), **kwargs)(command)
    return command


def ast_options_to_dict(kwargs: dict, base: dict | None = None) -> dict | None:
    """Pop the `--ast-*` values from a command's kwargs; return `base` (the recipe's `ast` mapping) updated with the
    given ones, or None when AST is not requested. `ast_resume` stays in kwargs (it is a run flag, not recipe)."""
    given = {}
    for flag, field, _ in AST_OPTIONS:
        value = kwargs.pop(_param_name(flag), None)
        if value is not None:
            given[field] = value
    if not given and not base:
        return None
    return {**(base or {}), **given}


def validate_ast_recipe(ast: dict, vnm: str | None, calib: str | None) -> dict:
    """Check a recipe's `ast` mapping (unknown keys, values) and what AST needs from the rest of the recipe."""
    if not isinstance(ast, dict):
        raise UsageError(f"ast: expected a mapping of AST options, got {ast!r}")
    known = {f.name for f in dataclasses.fields(ASTConfig)} - {"log_path", "device"}
    unknown = sorted(set(ast) - known)
    if unknown:
        raise UsageError(f"ast: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    ASTConfig(**ast)  # raises UsageError naming the --ast-* flag
    if vnm is None:
        raise UsageError("--ast-steps: AST recovers accuracy lost to V:N:M pruning; give --vnm too")
    if not calib:
        raise UsageError("--ast-steps: AST trains on calibration text, give --calib FILE (e.g. a validation split)")
    return ast


def ast_workdir(output: str | Path) -> Path:
    """Where AST keeps checkpoints, its log and the teacher cache: `<output>.ast/`, next to the artifact (the artifact
    itself is written atomically at the very end, so it cannot hold state that must survive a crash)."""
    out = Path(output).absolute()
    return out.with_name(out.name + ".ast")


def training_ids(tokenizer, path: str | Path, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """All (or the first `max_windows`) windows of `seqlen` tokens of a text file, encoded as for calibration and
    evaluation (lines without special tokens, each followed by EOS): AST's training data [windows, seqlen]. AST
    wants more text than the 128 calibration windows, so the whole file is used by default."""
    from ...runtime.evaluate import perplexity_ids, read_lines

    ids = perplexity_ids(tokenizer, read_lines(path), None if max_windows is None else max_windows * seqlen)
    n = len(ids) // seqlen
    if n < 1:
        raise UsageError(f"--calib: {path} has {len(ids)} tokens, fewer than one AST window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


def ast_from_pipeline(model: torch.nn.Module, teacher: torch.nn.Module, plan, calib_ids: torch.Tensor, ast: dict,
                      output_dir: str | Path, progress: bool = True, scores: dict[str, torch.Tensor] | None = None,
                      resume: bool = False, device: str | torch.device = "auto"
                      ) -> tuple[torch.nn.Module, dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run AST on the pipeline's pruned model; returns (model, metrics, extra_tensors, scores).

    `model`: the float32 model after channel permutation and refit (dense weights are fine too: `scores` then give
    the initial masks). `teacher`: the dense model (any channel order). `plan`: the pipeline Plan. `calib_ids`:
    [samples, seqlen] calibration windows (train on a validation split, never on test text). `ast`: the recipe's
    `ast` mapping. `output_dir`: AST's work directory (`ast_workdir(output)`).

    Returns the trained model (the same object, except under torchrun where rank 0 gets it rebuilt from the gathered
    weights and the other ranks None), JSON metrics for the manifest (`metrics["ast"]`), the SLoRB branches as
    `run_ast` names them (`<module>.slorb.weight`; the artifact stores them as `<module>.slorb`), and new importance
    scores per V:N:M module that make `vnm_compress` pick exactly AST's final masks.
    """
    config = ASTConfig(**{**ast, "device": str(device)})
    stats = run_ast(model, teacher, plan, calib_ids, config, output_dir, resume=resume, progress=progress,
                    scores=scores)
    extra = stats.pop("extra_tensors")
    state = stats.pop("state_dict", None)
    if ast_dist.is_distributed():
        model = _rebuild(model, state) if ast_dist.rank() == 0 else None
    new_scores = {}
    if model is not None:
        for name, scheme in plan.schemes.items():
            if scheme.vnm is not None:
                w = model.get_submodule(name).weight.detach().float().cpu()
                kept = w != 0
                new_scores[name] = w.abs() + kept.float()  # kept entries outrank every pruned one
    stats["slorb_group"] = config.slorb_group if config.slorb else None
    log.info("AST: %d steps, loss %.4f -> %.4f, final flip rate %.2e, %.0f tokens/s", config.steps,
             stats["loss_first"] or float("nan"), stats["loss_last"] or float("nan"), stats["final_flip_rate"],
             stats["tokens_per_second"] or 0)
    return model, stats, extra, new_scores


def _rebuild(sharded: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU model from the full weights gathered after FSDP training (the sharded one is not usable)."""
    from ...models import build_model

    config = getattr(sharded, "lowc_config", None)
    if config is None:
        raise UsageError("AST under torchrun needs a model loaded by lowc (with .lowc_config) to rebuild it")
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for attr in ("tokenizer", "lowc_config", "lowc_path", "lowc_manifest"):
        if hasattr(sharded, attr):
            setattr(model, attr, getattr(sharded, attr))
    return model


def ast_log_path(workdir: str | Path) -> Path | None:
    """AST's JSONL log in its work directory (None before the first run wrote it); the pipeline copies it into the
    artifact as `ast_log.jsonl`."""
    logfile = Path(workdir) / "ast" / "log.jsonl"
    return logfile if logfile.is_file() else None


def finish_ast_workdir(workdir: str | Path) -> None:
    """After the artifact is written (it holds the log): remove AST's work directory, checkpoints and teacher cache
    included. Until then the directory stays, so an interrupted or failed run can be resumed."""
    workdir = Path(workdir)
    if (workdir / "ast").is_dir():
        shutil.rmtree(workdir / "ast")
    if workdir.is_dir() and not any(workdir.iterdir()):
        workdir.rmdir()


__all__ = ["AST_OPTIONS", "add_ast_options", "ast_options_to_dict", "validate_ast_recipe", "ast_workdir",
           "training_ids", "ast_from_pipeline", "ast_log_path", "finish_ast_workdir"]
