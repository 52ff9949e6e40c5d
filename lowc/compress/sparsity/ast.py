"""AST, the Adaptive Sparse Trainer (arXiv 2407.20584): recover the accuracy of a V:N:M-pruned model by training.

The pruned model (student) learns from the dense model (teacher) on calibration text:

* loss = alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE(next token);
* masks are recomputed from the current latent weights every `mask_interval` steps (exact V:N:M masks from
  `vnm.vnm_keep_mask`, scored by |w| or |w| * ||x_j|| as Wanda does), and the weights the model runs are always
  `latent * mask`; the latent weights get straight-through gradients plus an annealed SR-STE decay
  `lambda(t) * (1 - mask) * w` on the pruned entries only (lambda ramps linearly to `srste_lambda`, then holds),
  which pulls pruned weights towards zero so that masks settle (the flip rate falls);
* optional SLoRB branches (slorb.py) and three-staged LoRA (lora_stages.py);
* checkpoints every `checkpoint_every` steps (ast_checkpoint.py), `resume=True` continues bit-for-bit;
* under `torchrun`, FSDP2 shards student and teacher per decoder layer (ast_dist.py) and every rank takes its share
  of each global batch; the teacher's top-k logits can be cached on disk instead (ast_teacher.py).

`ASTConfig(baseline=True)` runs plain masked fine-tuning through the same loop (CE only, fixed mask, masked
gradients, pruned weights held at zero) so the two can be compared at equal steps.

At the end the student's Linears are plain `nn.Linear` again with `weight = latent * mask` (exactly V:N:M), LoRA is
merged, and SLoRB branches are returned as extra tensors `<module>.slorb.weight`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...console import progress_bar
from ...errors import UsageError
from . import ast_dist as D
from .ast_checkpoint import (clear_checkpoints, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                             set_rng_state)
from .ast_linear import ASTLinear, attach, set_submodule
from .ast_teacher import TeacherLogits, distill_kl
from .lora_stages import DENSE, REPRUNE, lora_generator, merge_lora, reset_adapter_state, stage_at
from .vnm import VNMSpec, vnm_keep_mask

log = logging.getLogger("lowc.compress")
MASK_IMPORTANCE = ("wanda", "magnitude")
RESUME_MAY_CHANGE = ("checkpoint_every", "log_path", "device")  # every other option must match to resume


@dataclass
class ASTConfig:
    """What AST does. Defaults follow the AST paper where it gives one (T = 2, masks every 10 steps, SR-STE decay
    ramped then held); the rest are choices that worked on lowc's reference model.

    steps / lr / batch_size (global, over all ranks) / seqlen (None: the training windows' width): the run.
    alpha, temperature: the distillation loss. mask_interval: steps between mask recomputations (Δt);
    mask_importance: "wanda" (|w| * input-channel norms measured on the student at the start) or "magnitude".
    srste_lambda: the SR-STE decay λ after its linear ramp over `srste_ramp` of the steps. slorb / slorb_group:
    the SLoRB branch. lora / lora_rank / lora_alpha / lora_dense_fraction / lora_reprune_fraction: three-staged
    LoRA instead of full fine-tuning. checkpoint_every: steps between checkpoints (0: none). log_path: JSONL log
    (default <output>/ast/log.jsonl). teacher_topk: KL over the teacher's k largest logits (None: all);
    teacher_cache: compute those once to disk and free the teacher. baseline: plain masked fine-tuning.
    """

    steps: int = 200
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    batch_size: int = 8
    seqlen: int | None = None
    alpha: float = 0.5
    temperature: float = 2.0
    mask_interval: int = 10
    mask_importance: str = "wanda"
    srste_lambda: float = 0.05
    srste_ramp: float = 0.5
    slorb: bool = False
    slorb_group: int = 16
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dense_fraction: float = 0.05
    lora_reprune_fraction: float = 0.05
    train_norms: bool = True
    train_embeddings: bool = False
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    checkpoint_every: int = 50
    log_path: str | None = None
    seed: int = 0
    device: str = "auto"
    teacher_topk: int | None = None
    teacher_cache: bool = False
    baseline: bool = False
    norm_samples: int = 32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str, value, kind=int, zero: bool = False) -> None:
            ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if zero else value > 0)
            if not ok:
                raise UsageError(f"--ast-{name.replace('_', '-')}: expected a {'non-negative' if zero else 'positive'} "
                                 f"{'integer' if kind is int else 'number'}, got {value!r}")
        positive("steps", self.steps)
        positive("lr", self.lr, (int, float))
        positive("batch_size", self.batch_size)
        positive("mask_interval", self.mask_interval)
        positive("checkpoint_every", self.checkpoint_every, zero=True)
        positive("temperature", self.temperature, (int, float))
        positive("srste_lambda", self.srste_lambda, (int, float), zero=True)
        positive("slorb_group", self.slorb_group)
        positive("lora_rank", self.lora_rank)
        if self.seqlen is not None:
            positive("seqlen", self.seqlen)
        if self.teacher_topk is not None:
            positive("teacher_topk", self.teacher_topk)
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"--ast-alpha: expected a number from 0 to 1, got {self.alpha!r}")
        if self.mask_importance not in MASK_IMPORTANCE:
            raise UsageError(f"--ast-mask-importance: expected one of {', '.join(MASK_IMPORTANCE)}, "
                             f"got {self.mask_importance!r}")
        if not 0 <= self.lora_dense_fraction + self.lora_reprune_fraction <= 1:
            raise UsageError("--ast-lora: the dense and re-pruning stages must take at most all the steps")
        if self.teacher_cache and self.baseline:
            raise UsageError("--ast-teacher-cache: the baseline (masked fine-tuning) has no teacher")

    @property
    def distill(self) -> bool:
        return not self.baseline and self.alpha > 0

    @property
    def adaptive(self) -> bool:
        """Whether masks are recomputed during training (full AST; in LoRA mode only in stage 2)."""
        return not self.baseline

    @property
    def ste(self) -> bool:
        return not self.baseline and not self.lora

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- schedules and data

def lr_at(step: int, c: ASTConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` (a pure function of the step: nothing to checkpoint)."""
    warmup = c.warmup_steps if c.warmup_steps is not None else max(1, c.steps // 20)
    if step < warmup:
        return c.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, c.steps - warmup)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def lambda_at(step: int, c: ASTConfig) -> float:
    """SR-STE decay: linear ramp over `srste_ramp` of the steps, then constant."""
    if not c.ste:
        return 0.0
    ramp = max(1, int(c.steps * c.srste_ramp))
    return c.srste_lambda * min(1.0, (step + 1) / ramp)


def windows(ids: torch.Tensor, seqlen: int | None) -> torch.Tensor:
    """Training windows [N, seqlen] (re-cut from the given windows when `seqlen` differs)."""
    if ids.dim() != 2:
        raise UsageError(f"AST training ids must be [windows, tokens], got shape {list(ids.shape)}")
    if seqlen is None or seqlen == ids.shape[1]:
        return ids
    flat = ids.reshape(-1)
    n = flat.numel() // seqlen
    if n < 1:
        raise UsageError(f"--ast-seqlen {seqlen}: only {flat.numel()} training tokens")
    return flat[: n * seqlen].view(n, seqlen)


class BatchOrder:
    """Global batch `step` as row indices: a fresh seeded permutation of the windows every epoch (stateless)."""

    def __init__(self, rows: int, batch: int, seed: int):
        self.rows, self.batch, self.seed, self._perms = rows, batch, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.rows, generator=torch.Generator().manual_seed(
                self.seed * 7919 + epoch))}
        return self._perms[epoch]

    def __call__(self, step: int) -> torch.Tensor:
        out = []
        for i in range(step * self.batch, (step + 1) * self.batch):
            epoch, pos = divmod(i, self.rows)
            out.append(int(self._perm(epoch)[pos]))
        return torch.tensor(out, dtype=torch.long)


# ------------------------------------------------------------------------------------------------------------ masks

def _specs(model: nn.Module, vnm) -> dict[str, VNMSpec]:
    """Module name -> V:N:M spec from a pipeline Plan, a {name: spec} dict or one spec for every decoder Linear."""
    if hasattr(vnm, "schemes"):
        return {m: s.vnm for m, s in vnm.schemes.items() if s.vnm is not None}
    if isinstance(vnm, dict):
        return {m: VNMSpec.parse(str(s)) if not isinstance(s, VNMSpec) else s for m, s in vnm.items()}
    spec = vnm if isinstance(vnm, VNMSpec) else VNMSpec.parse(str(vnm))
    return {n: spec for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (".layers." in n or ".layer." in n)}


def _importance(weight: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().float().abs()
    return w * norm.to(w.device).float() if norm is not None else w


@torch.no_grad()
def recompute_masks(modules: dict[str, ASTLinear], norms: dict[str, torch.Tensor]) -> float:
    """New V:N:M masks from the current latent weights; returns the flip rate (changed entries / all entries)."""
    changed = total = 0
    for name, m in modules.items():
        keep = vnm_keep_mask(_importance(D.full(m.weight), norms.get(name)), m.spec).to(m.mask.device)
        changed += int((keep != m.mask).sum())
        total += keep.numel()
        m.mask.copy_(keep)
    return changed / max(1, total)


@torch.no_grad()
def apply_masks(modules: dict[str, ASTLinear]) -> None:
    """latent weight *= mask (this rank's rows): pruned weights become exactly zero."""
    for m in modules.values():
        D.local(m.weight).mul_(D.local_rows(m.mask, m.weight).to(m.weight.dtype))


@torch.no_grad()
def srste_decay(modules: dict[str, ASTLinear], lam: float) -> None:
    """grad += lam * (1 - mask) * w on the pruned weights only (before the optimizer step)."""
    if lam <= 0:
        return
    for m in modules.values():
        if m.weight.grad is not None:
            w = D.local(m.weight)
            pruned = ~D.local_rows(m.mask, m.weight)
            D.local(m.weight.grad).add_(lam * pruned.to(w.dtype) * w)


def is_vnm(keep: torch.Tensor, spec: VNMSpec) -> bool:
    """Whether a keep mask is exactly V:N:M: per V x M block the same <= 4 columns, per row 2 kept per block."""
    rows, cols = keep.shape
    rp, kp = spec.padded_shape(rows, cols)
    k = F.pad(keep.bool(), (0, kp - cols, 0, rp - rows))
    blocks = k.reshape(rp // spec.v, spec.v, kp // spec.m, spec.m)
    per_row = blocks.sum(-1)[(torch.arange(rp) < rows).reshape(rp // spec.v, spec.v)]  # [real rows, Kb]
    full_blocks = cols // spec.m  # a last, partial block may have chosen padding columns
    if not bool((per_row[:, :full_blocks] == 2).all() and (per_row <= 2).all()):
        return False
    return bool((blocks.any(1).sum(-1) <= 4).all())


# -------------------------------------------------------------------------------------------------------- the run

def _device(c: ASTConfig) -> torch.device:
    if D.is_distributed():
        if torch.cuda.is_available() and c.device != "cpu":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", D.rank() % torch.cuda.device_count())))
        return torch.device("cpu")
    if c.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--ast-device cuda: CUDA is not available on this machine")
    return torch.device(c.device)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        return list(model.model.layers)
    if hasattr(model, "encoder"):
        return list(model.encoder.layer)
    return []


def _input_norms(model: nn.Module, ids: torch.Tensor, names: set[str], device: torch.device) -> dict[str, torch.Tensor]:
    from ..calibration import input_norms

    norms = input_norms(model, ids.to(device), batch_size=4, progress=False)
    return {n: v for n, v in norms.items() if n in names}


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def run_ast(model: nn.Module, teacher: nn.Module | None, vnm, train_ids: torch.Tensor, config: ASTConfig,
            output_dir: str | Path, resume: bool = False, progress: bool = True,
            scores: dict[str, torch.Tensor] | None = None,
            on_step: Callable[[dict], None] | None = None) -> dict:
    """Train the V:N:M-pruned `model` in place (see the module docstring) and return statistics.

    `vnm`: a pipeline Plan, {module: spec} or one spec for every decoder Linear. `train_ids` [N, T] token windows.
    `scores`: importance [R, K] per module for the *initial* masks (default: the weights scored as
    `config.mask_importance`). Checkpoints and the JSONL log go under `output_dir/ast/`. The returned dict is JSON
    except `extra_tensors` (SLoRB branches by artifact name) and, under torch.distributed, `state_dict` (rank 0:
    the final full weights, since the sharded model itself is not usable afterwards).
    """
    c = config
    if getattr(model, "kind", "decoder") != "decoder":
        raise UsageError("AST trains decoders (next-token loss); this model is an encoder")
    if c.distill and teacher is None:
        raise UsageError("AST distillation needs the dense teacher model (or --ast-alpha 0)")
    device = _device(c)
    out = Path(output_dir) / "ast"
    ckpt_root = out / "checkpoints"
    log_path = Path(c.log_path) if c.log_path else out / "log.jsonl"
    data = windows(train_ids.cpu(), c.seqlen)
    if data.shape[1] > model.config.max_position_embeddings:
        raise UsageError(f"--ast-seqlen: {data.shape[1]} exceeds the model's max_position_embeddings")
    specs = _specs(model, vnm)
    if not specs:
        raise UsageError("AST: no V:N:M modules to train (give --vnm)")
    world = D.world_size()
    if c.batch_size % world:
        raise UsageError(f"--ast-batch-size {c.batch_size} must be divisible by the number of ranks ({world})")
    main = D.rank() == 0

    # --- student: norms, initial masks, AST modules, trainable parameters. Under torch.distributed the model stays
    # where it is (CPU) until FSDP2 moves each rank's shards to its device; calibration moves one layer at a time.
    if not D.is_distributed():
        model.to(device)
    was_training = model.training
    model.train()
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    norms = {}
    if c.mask_importance == "wanda":
        norms = _input_norms(model, data[: c.norm_samples], set(specs), device)
    masks = {}
    for name, spec in specs.items():
        w = model.get_submodule(name).weight
        imp = scores[name] if scores is not None and name in scores else _importance(w, norms.get(name))
        masks[name] = vnm_keep_mask(imp.to(device), spec).to(w.device)
    modules = attach(model, specs, masks, ste=c.ste)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, (name, m) in enumerate(modules.items()):
        if c.lora:
            m.add_lora(c.lora_rank, c.lora_alpha, lora_generator(c.seed, -1, i))
        else:
            m.weight.requires_grad_(True)
            if m.bias is not None:
                m.bias.requires_grad_(True)
        if c.slorb:
            m.add_slorb(c.slorb_group)
    if not c.lora:
        for n, p in model.named_parameters():
            if (c.train_norms and "norm" in n) or (c.train_embeddings and ("embed" in n or "lm_head" in n)):
                p.requires_grad_(True)
    if c.baseline:
        apply_masks(modules)

    # --- teacher (resident, sharded, or cached to disk)
    targets = None
    if c.distill:
        if teacher is not None:
            teacher.eval()
            if not D.is_distributed():
                teacher.to(device)
            for p in teacher.parameters():
                p.requires_grad_(False)
        if D.is_distributed():
            if teacher is not None:
                D.shard(teacher, _decoder_layers(teacher), device)
        targets = TeacherLogits(teacher, data, c.teacher_topk)
        if c.teacher_cache:
            targets.build_cache(out / "teacher_cache", device)
            targets.release_teacher()
            teacher = None
    if D.is_distributed():
        D.shard(model, _decoder_layers(model), device)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([p for _, p in named], lr=c.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=c.weight_decay)
    saved_names = sorted({n for n, _ in named} | {f"{m}.weight" for m in modules})

    # --- resume
    history: list[dict] = []
    start = 0
    fresh = not resume
    if resume:
        path = latest_checkpoint(ckpt_root)
        if path is None:
            log.info("AST: --ast-resume given but no checkpoint in %s; starting from step 0", ckpt_root)
            fresh = True
        else:
            tensors, state = load_checkpoint(path)
            mismatch = {k for k, v in c.to_dict().items()
                        if k not in RESUME_MAY_CHANGE and state["config"].get(k) != v}
            if mismatch:
                raise UsageError(f"--ast-resume: {path} was written with different {', '.join(sorted(mismatch))}; "
                                 "resume with the same AST options or start afresh without --ast-resume")
            for n, t in tensors["student"].items():
                D.assign_full(params[n], t.to(params[n].dtype))
            for n, t in tensors["masks"].items():
                modules[n].mask.copy_(t.to(modules[n].mask.device))
            norms = {n[len("norm::"):]: t for n, t in tensors["extra"].items() if n.startswith("norm::")}
            for n, p in named:
                state_p = {k.split("::", 1)[1]: t for k, t in tensors["optimizer"].items()
                           if k.split("::", 1)[0] == n}
                if state_p:
                    optimizer.state[p] = {k: (t if k == "step" else D.like_param(p, t.to(p.dtype)))
                                          for k, t in state_p.items()}
            set_rng_state(state["rng"])
            start, history = state["step"], state["history"]
            log.info("AST: resumed from %s (step %d of %d)", path, start, c.steps)
    if fresh and main:
        if not resume and latest_checkpoint(ckpt_root) is not None:
            log.warning("AST: starting afresh; removing the checkpoints in %s (pass --ast-resume to continue them)",
                        ckpt_root)
        clear_checkpoints(ckpt_root)
    if main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = log_path.with_name(log_path.name + f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        os.replace(tmp, log_path)

    def checkpoint(step: int) -> None:
        student = {n: D.full(params[n]).detach().cpu() for n in saved_names}
        optim = {}
        for n, p in named:
            for k, t in optimizer.state.get(p, {}).items():
                optim[f"{n}::{k}"] = D.full(t).detach().cpu() if torch.is_tensor(t) else torch.tensor(t)
        if main:
            save_checkpoint(ckpt_root, step, {
                "student": student, "masks": {n: m.mask.cpu() for n, m in modules.items()}, "optimizer": optim,
                "extra": {f"norm::{n}": t for n, t in norms.items()}},
                {"config": c.to_dict(), "rng": rng_state(), "history": history, "world_size": world})
        D.barrier()

    # --- train
    order = BatchOrder(data.shape[0], c.batch_size, c.seed)
    tokens_per_step = c.batch_size * data.shape[1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_seconds = 0.0
    # tiny AdamW moments underflow into subnormal floats, which slow CPU math 100x; flushing them changes nothing
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        with progress_bar(progress and main) as bar, open(log_path, "a") if main else open(os.devnull, "w") as logf:
            label = "masked fine-tuning" if c.baseline else "AST"
            task = bar.add_task(label, total=c.steps, completed=start)
            for step in range(start, c.steps):
                t0 = time.perf_counter()
                flip = None
                stage = stage_at(step, c.steps, c.lora_dense_fraction, c.lora_reprune_fraction) if c.lora else None
                for m in modules.values():
                    m.sparse = stage != DENSE
                if c.lora and stage == REPRUNE and step % c.mask_interval == 0:
                    for i, m in enumerate(modules.values()):
                        merge_lora(m, lora_generator(c.seed, step, i))
                        reset_adapter_state(optimizer, m)
                    flip = recompute_masks(modules, norms)
                elif not c.lora and c.adaptive and step > 0 and step % c.mask_interval == 0:
                    flip = recompute_masks(modules, norms)
                rows = D.split_batch(order(step))
                batch = data[rows].to(device)
                logits = model(batch)
                ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
                kl = torch.zeros((), device=device)
                if targets is not None:
                    values, indices = targets(rows, batch)
                    kl = distill_kl(logits, values, indices, c.temperature)
                alpha = c.alpha if c.distill else 0.0
                loss = alpha * c.temperature ** 2 * kl + (1 - alpha) * ce
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lam = lambda_at(step, c)
                srste_decay(modules, lam)
                if c.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], c.grad_clip)
                lr = lr_at(step, c)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                if not c.ste and not c.lora:
                    apply_masks(modules)
                loss_v, kl_v, ce_v = D.mean_across_ranks([float(t.detach()) for t in (loss, kl, ce)], device)
                train_seconds += time.perf_counter() - t0
                record = {"step": step + 1, "loss": loss_v, "kl": kl_v, "ce": ce_v, "lr": lr, "lambda": lam,
                          "flip_rate": flip, "seconds": round(train_seconds, 3)}
                if stage is not None:
                    record["stage"] = stage
                history.append(record)
                if main:
                    logf.write(json.dumps(record) + "\n")
                    logf.flush()
                if on_step is not None:
                    on_step(record)
                bar.update(task, advance=1, description=f"{label} loss {loss_v:.3f}"
                           + (f" flip {flip:.1e}" if flip is not None else ""))
                if c.checkpoint_every and (step + 1) % c.checkpoint_every == 0 and step + 1 < c.steps:
                    checkpoint(step + 1)

    finally:
        if flush:
            torch.set_flush_denormal(False)
    if c.checkpoint_every and start < c.steps:
        checkpoint(c.steps)  # the raw end-of-training state: a later failure need not train again

    # --- finish: a last mask measurement, LoRA merged, weights pruned, plain Linears back
    final_flip = recompute_masks(modules, norms) if (c.adaptive and not c.lora) else 0.0
    for m in modules.values():
        m.sparse = True
        if c.lora:
            merge_lora(m)
    apply_masks(modules)
    extra = {f"{n}.slorb.weight": D.full(m.slorb.weight).detach().cpu() for n, m in modules.items()
             if m.slorb is not None}
    state_dict = None
    if D.is_distributed():
        full_state = {n: D.full(p).detach().cpu() for n, p in model.named_parameters()
                      if ".lora_" not in n and ".slorb." not in n}
        state_dict = full_state if main else None
    else:
        for name, m in modules.items():
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            linear.weight = m.weight
            if m.bias is not None:
                linear.bias = m.bias
            set_submodule(model, name, linear)
        for n, p in model.named_parameters():
            p.requires_grad_(requires.get(n, p.requires_grad))
        model.train(was_training)
    flips = [(r["step"], r["flip_rate"]) for r in history if r.get("flip_rate") is not None]
    steps_run = c.steps - start
    stats = {
        "mode": ("masked fine-tuning" if c.baseline else "AST") + (" +LoRA" if c.lora else "")
                + (" +SLoRB" if c.slorb else ""),
        "steps": c.steps, "resumed_from": start, "world_size": world, "device": str(device),
        "tokens_per_step": tokens_per_step, "train_seconds": round(train_seconds, 3),
        "tokens_per_second": steps_run * tokens_per_step / train_seconds if train_seconds else None,
        "loss_first": history[0]["loss"] if history else None, "loss_last": history[-1]["loss"] if history else None,
        "kl_last": history[-1]["kl"] if history else None, "ce_last": history[-1]["ce"] if history else None,
        "flip_rate_curve": flips, "final_flip_rate": final_flip,
        "loss_curve": [(r["step"], r["loss"]) for r in history[:: max(1, len(history) // 200)]],
        "modules": len(modules), "log": str(log_path), "config": c.to_dict(),
        "extra_tensors": extra, **_peak_memory(device),
    }
    if D.is_distributed():
        stats["state_dict"] = state_dict
    return stats


__all__ = ["ASTConfig", "run_ast", "recompute_masks", "apply_masks", "is_vnm", "lr_at", "lambda_at", "BatchOrder"]
