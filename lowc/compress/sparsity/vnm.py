"""V:N:M sparsity (VENOM format): spec parsing, exact mask search and compression to canonical storage.

A weight [R, K] is cut into blocks of V rows x M columns along K. Every block keeps 4 of its M columns (the same
4 for all V rows) and, inside those, each row keeps 2 of 4 (2:4). Density is 2/M. K is padded with zero columns
to a multiple of M and R with zero rows to a multiple of V; the true shape is recorded next to the tensors.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from ...errors import UsageError

MAX_M = 16


@dataclass(frozen=True)
class VNMSpec:
    """A V:N:M pattern: V rows share the 4 kept columns of each M-column block; N=2 of those 4 per row."""

    v: int
    n: int
    m: int

    @classmethod
    def parse(cls, text: str, flag: str = "--vnm") -> "VNMSpec":
        """Parse 'V:N:M' (e.g. '64:2:5'); a malformed spec raises UsageError naming the flag."""
        match = re.fullmatch(r"\s*(\d+):(\d+):(\d+)\s*", str(text))
        if not match:
            raise UsageError(f"{flag}: expected V:N:M such as 64:2:5, got '{text}'")
        spec = cls(*(int(g) for g in match.groups()))
        spec.validate(flag)
        return spec

    def validate(self, flag: str = "--vnm") -> None:
        if self.v < 16 or self.v % 16:
            raise UsageError(f"{flag}: V must be a positive multiple of 16 (16, 32, 64, 128, ...), got {self.v}")
        if self.n != 2:
            raise UsageError(f"{flag}: N must be 2 (each row keeps 2 of the 4 selected columns), got {self.n}")
        if not 4 <= self.m <= MAX_M:
            raise UsageError(f"{flag}: M must be between 4 and {MAX_M} (M=4 is plain 2:4), got {self.m}")

    def __str__(self) -> str:
        return f"{self.v}:{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return 2.0 / self.m

    def padded_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Rows padded to a multiple of V, columns to a multiple of M."""
        return -(-rows // self.v) * self.v, -(-cols // self.m) * self.m

    def storage_shapes(self, rows: int, cols: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the canonical tensors: values [R, 2*Kp/M], columns [Rp/V, Kp/M, 4], positions [R, Kp/M, 2]."""
        rp, kp = self.padded_shape(rows, cols)
        kb = kp // self.m
        return {"values": (rows, 2 * kb), "columns": (rp // self.v, kb, 4), "positions": (rows, kb, 2)}


@lru_cache(maxsize=None)
def column_subsets(m: int) -> torch.Tensor:
    """All C(M, 4) sorted 4-column subsets of an M-column block, as int64 [C, 4]."""
    return torch.tensor(list(itertools.combinations(range(m), 4)), dtype=torch.int64)


def _pad2d(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


@lru_cache(maxsize=None)
def _subset_pairs(m: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Each 4-subset {i<j<k<l} split into the pairs (i,j) and (k,l), as indices into all C(M,2) pairs."""
    pairs = list(itertools.combinations(range(m), 2))
    index = {p: n for n, p in enumerate(pairs)}
    subsets = column_subsets(m).tolist()
    first = torch.tensor([index[(a, b)] for a, b, _, _ in subsets])
    second = torch.tensor([index[(c, d)] for _, _, c, d in subsets])
    return first, second, pairs


def _top2_positions(x: torch.Tensor) -> torch.Tensor:
    """Positions (ascending) of the 2 largest of the 4 entries on the last dim; ties go to the lower position."""
    cols = x.unbind(-1)
    kept = []
    for i in range(4):
        beaten = sum(((cols[j] > cols[i]) | ((cols[j] == cols[i]) & (j < i))).to(torch.int8) for j in range(4) if j != i)
        kept.append(beaten < 2)
    kept = torch.stack(kept, dim=-1)
    first = kept.to(torch.int8).argmax(-1)
    last = 3 - kept.flip(-1).to(torch.int8).argmax(-1)
    return torch.stack([first, last], dim=-1)


def vnm_mask(importance: torch.Tensor, spec: VNMSpec, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose kept columns and 2:4 positions that retain the most importance.

    For every V x M block all C(M,4) column subsets are scored by the importance their 2:4 pruning keeps (the sum
    over the V rows of each row's two largest entries) and the best is kept, as VENOM's mask builder does; ties go
    to the lexicographically first subset. A row's top-2 of a subset {i,j,k,l} is max(max(wi,wj) + max(wk,wl),
    wi + wj, wk + wl), so every subset is scored from C(M,2) pair sums and maxima without gathering.
    Returns (columns uint8 [Rp/V, Kp/M, 4], positions uint8 [R, Kp/M, 2]); positions index into the 4 kept columns.
    """
    rows, cols = importance.shape
    rp, kp = spec.padded_shape(rows, cols)
    v, m, kb = spec.v, spec.m, kp // spec.m
    imp = _pad2d(importance.detach().float().abs(), rp, kp)
    first, second, pairs = _subset_pairs(m)
    best = torch.empty(rp // v, kb, dtype=torch.long, device=imp.device)
    step = max(v, chunk_rows // v * v)
    for r0 in range(0, rp, step):
        # column-major blocks [M, rows, Kb] so that picking a column is a contiguous slice
        blk = imp[r0:r0 + step].reshape(-1, kb, m).permute(2, 0, 1).contiguous()
        pair_sum = torch.stack([blk[i] + blk[j] for i, j in pairs])
        pair_max = torch.stack([torch.maximum(blk[i], blk[j]) for i, j in pairs])
        top_score = None
        for c in range(len(first)):
            f, s2 = int(first[c]), int(second[c])
            row_top2 = torch.maximum(pair_max[f] + pair_max[s2], torch.maximum(pair_sum[f], pair_sum[s2]))
            score = row_top2.reshape(-1, v, kb).sum(1)
            if top_score is None:
                top_score, choice = score, torch.zeros_like(score, dtype=torch.long)
            else:
                better = score > top_score
                top_score = torch.where(better, score, top_score)
                choice = torch.where(better, c, choice)
        best[r0 // v:(r0 + blk.shape[1]) // v] = choice
    columns = column_subsets(m).to(imp.device)[best]  # [Rp/V, Kb, 4]
    blocks = imp.reshape(rp // v, v, kb, m)
    chosen = torch.gather(blocks, 3, columns.unsqueeze(1).expand(-1, v, -1, -1))  # [Rb, V, Kb, 4]
    positions = _top2_positions(chosen).reshape(rp, kb, 2)[:rows]
    return columns.to(torch.uint8), positions.to(torch.uint8)


def kept_column_index(columns: torch.Tensor, positions: torch.Tensor, spec: VNMSpec) -> torch.Tensor:
    """Absolute (padded) input-column index of every stored value, int64 [R, 2*Kp/M]."""
    rows, kb, _ = positions.shape
    block_cols = columns.long().repeat_interleave(spec.v, dim=0)[:rows]  # [R, Kb, 4]
    within = torch.gather(block_cols, 2, positions.long())  # [R, Kb, 2]
    base = torch.arange(kb, device=columns.device).view(1, kb, 1) * spec.m
    return (within + base).reshape(rows, 2 * kb)


def vnm_compress(weight: torch.Tensor, spec: VNMSpec, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Prune `weight` [R, K] to V:N:M and return its canonical storage (values, columns, positions).

    `importance` defaults to |weight| (magnitude pruning). Values keep the weight's dtype.
    """
    if weight.dim() != 2:
        raise ValueError(f"V:N:M needs a 2-D weight, got shape {tuple(weight.shape)}")
    columns, positions = vnm_mask(weight if importance is None else importance, spec)
    rows, cols = weight.shape
    _, kp = spec.padded_shape(rows, cols)
    padded = torch.nn.functional.pad(weight, (0, kp - cols))
    values = torch.gather(padded, 1, kept_column_index(columns, positions, spec))
    return {"values": values, "columns": columns, "positions": positions}


def keep_mask(kept_index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The bool [R, K] mask of the entries that `kept_column_index` points at (True = kept)."""
    rows, cols = shape
    width = max(cols, int(kept_index.max()) + 1 if kept_index.numel() else cols)
    keep = torch.zeros(rows, width, dtype=torch.bool, device=kept_index.device)
    keep.scatter_(1, kept_index, True)
    return keep[:, :cols]


def vnm_keep_mask(importance: torch.Tensor, spec: VNMSpec) -> torch.Tensor:
    """The bool [R, K] mask of the weights that V:N:M pruning by `importance` keeps (True = kept)."""
    columns, positions = vnm_mask(importance, spec)
    return keep_mask(kept_column_index(columns, positions, spec), tuple(importance.shape))
