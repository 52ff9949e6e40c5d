"""Teacher logits for AST's distillation loss: from a resident teacher, or from a top-k cache on disk.

The cache stores, for every training window and token, the teacher's `k` largest logits (bf16) and their vocabulary
indices (int32) in safetensors files of `chunk` windows each, plus `meta.json` with a fingerprint of the training
data, the teacher and k. It is computed once (every rank takes its share of the chunks; FSDP needs all ranks in
every forward, so ranks step through the chunks in lockstep), after which the teacher can be freed. The distillation
KL over the top-k renormalises the teacher's probabilities on its k tokens; with k = vocabulary size it equals the
full KL.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import ast_dist


def fingerprint(ids: torch.Tensor, teacher: torch.nn.Module, k: int | None) -> str:
    """A hash of the training windows, the teacher's first and last parameters and k."""
    h = hashlib.sha256(ids.cpu().numpy().tobytes())
    params = list(teacher.parameters())
    for p in (params[0], params[-1]):
        h.update(ast_dist.full(p).detach().float().cpu().numpy().tobytes()[:1 << 20])
    h.update(f"{tuple(ids.shape)} k={k}".encode())
    return h.hexdigest()[:32]


def teacher_topk(logits: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, indices) of the k largest logits on the last dim; all logits and None when k is None."""
    if k is None or k >= logits.shape[-1]:
        return logits, None
    values, indices = logits.topk(k, dim=-1)
    return values, indices.to(torch.int32)


class TeacherLogits:
    """Serves teacher logits for given training rows: `(values [b, T, k|V], indices [b, T, k] | None)`."""

    def __init__(self, teacher: torch.nn.Module | None, ids: torch.Tensor, k: int | None,
                 cache_dir: Path | None = None, chunk: int = 8):
        self.teacher, self.ids, self.k, self.cache_dir, self.chunk = teacher, ids, k, cache_dir, chunk

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache_dir is None:
            return teacher_topk(self.teacher(batch).float(), self.k)
        values, indices = [], []
        files: dict[int, dict[str, torch.Tensor]] = {}
        for r in rows.tolist():
            c = r // self.chunk
            if c not in files:
                files[c] = load_file(str(self.cache_dir / f"rows-{c:07d}.safetensors"))
            values.append(files[c]["values"][r - c * self.chunk])
            indices.append(files[c]["indices"][r - c * self.chunk])
        device = batch.device
        return torch.stack(values).to(device).float(), torch.stack(indices).to(device)

    @torch.no_grad()
    def build_cache(self, cache_dir: Path, device: torch.device, progress=None) -> None:
        """Compute the top-k cache into `cache_dir` (reused when its fingerprint matches) and switch to it."""
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": fingerprint(self.ids, self.teacher, self.k), "k": self.k, "chunk": self.chunk,
                "rows": int(self.ids.shape[0]), "seqlen": int(self.ids.shape[1])}
        meta_path = cache_dir / "meta.json"
        if not (meta_path.is_file() and json.loads(meta_path.read_text()) == meta):
            world, rank = ast_dist.world_size(), ast_dist.rank()
            chunks = -(-self.ids.shape[0] // self.chunk)
            for first in range(0, chunks, world):
                c = first + rank
                real = c < chunks
                start = (c if real else 0) * self.chunk
                batch = self.ids[start:start + self.chunk].to(device)
                values, indices = teacher_topk(self.teacher(batch).float(), self.k)
                if indices is None:
                    indices = torch.empty(*values.shape[:2], 0, dtype=torch.int32)
                if real:
                    tmp = cache_dir / f"rows-{c:07d}.safetensors.tmp-{os.getpid()}"
                    save_file({"values": values.to(torch.bfloat16).cpu().contiguous(),
                               "indices": indices.cpu().contiguous()}, str(tmp))
                    os.replace(tmp, cache_dir / f"rows-{c:07d}.safetensors")
                if progress is not None:
                    progress(min(chunks, first + world), chunks)
            ast_dist.barrier()
            if ast_dist.rank() == 0:
                tmp = cache_dir / f"meta.json.tmp-{os.getpid()}"
                tmp.write_text(json.dumps(meta))
                os.replace(tmp, meta_path)
            ast_dist.barrier()
        self.cache_dir = cache_dir

    def release_teacher(self) -> None:
        """Drop the reference to the teacher (the cache serves the logits from now on)."""
        self.teacher = None


def distill_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor | None,
               temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature` (teacher restricted to its top-k when indexed)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_values.float() / temperature, dim=-1)
    if teacher_indices is not None and teacher_indices.shape[-1]:
        log_q = log_q.gather(-1, teacher_indices.long())
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


__all__ = ["TeacherLogits", "distill_kl", "teacher_topk", "fingerprint"]
