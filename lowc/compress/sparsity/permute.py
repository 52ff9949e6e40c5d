"""V:N:M-aware channel permutation, folded into the model so that its function is unchanged.

A V:N:M mask keeps 4 of every M columns per block of V rows, then 2 of those 4 in each row. Which channels share an
M-column group, and which rows share a V-row block, decides how much importance survives. Reordering a weight's input
channels (columns) and output channels (rows) costs nothing at inference once folded into the neighbouring layers. As
in the V:N:M paper (arXiv 2410.16135), input and output permutations alternate, each step a linear assignment that
maximises the importance kept after V:N:M pruning; here every step works on one channel axis and sums the objective
over all matrices that see it (e.g. an MLP's intermediate channels: down_proj's columns plus gate/up_proj's rows).

Search on one axis (`_search`), a few passes:

1. Regions and windows. A full K x K assignment is out of reach (Hungarian is cubic in K; 11008 channels take
   minutes), so each pass cuts the axis into random regions (sets of whole M-column groups, or of whole V-row blocks
   when the axis is also some matrix's rows) and each region into windows that hold at most one channel of every
   M-group (the t-th member of every group forms window t). Regions change every pass, so channels can travel
   anywhere over a few passes.
2. Cost of putting channel i into slot k of a window, all other channels staying where they are (exactly so, since
   no other member of the slot's groups is in the window), from the current exact V:N:M masks:
   - as a column, where the slot's column is one of its block's 4 selected columns: each row keeps its top 2 of the 4,
     so value x in row r adds relu(x - t_r), t_r the second largest of the 3 other selected values (a large channel
     displaces the weaker kept value);
   - where the slot's column is not selected: the block would give up its cheapest selected column u, so the gain is
     relu(sum_r relu(x_r - t'_r) - loss(u)), t'_r the second largest of the 3 columns left;
   - as a row: in each group, the row's top 2 of the 4 columns its new V-block selected.
   Each term is a lower bound of what the channel keeps there and is exact at the identity, so an assignment can only
   raise the kept importance. `scipy.optimize.linear_sum_assignment` (maximise) solves each window.
3. Masks of the touched groups/blocks are recomputed after every window. Matrices with more rows (or columns) than
   the cost budget allows estimate costs on a random sample of V-row blocks (M-column groups), fixed for a pass; each
   region's result is then checked against the exact kept importance (all rows and columns) and undone if it did not
   improve. A search returns the identity unless the total went up.

Folding (`permute_model`): Llama's residual stream (one global permutation: embeddings, every RMSNorm, q/k/v/gate/up
columns, o/down rows, lm_head columns; tied embeddings follow), MLP intermediate channels (gate/up rows == down_proj
columns) and v_proj rows within each KV head (== o_proj columns of every query head reading it). q/k rows are left
alone: RoPE rotates the pair (i, i + head_dim/2) at a frequency that depends on i, so moving a pair changes the
function. BERT: intermediate channels, value/output and query/key (identically) within heads; its residual stream is
the model's output, so it is permuted only on request (`allow_output_permutation=True`; the report then carries the
output permutation). What cannot be folded is skipped, logged on one line and listed in the report; nothing raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .vnm import VNMSpec, _subset_pairs, column_subsets, kept_column_index, vnm_mask

log = logging.getLogger("lowc.compress")

_COST_ELEMENTS = 3 * 10**8  # per pass: channels x window x cost rows (about 1 s of cost computation on 2 cores)
_MAX_WINDOW = 256  # channels per assignment
_MIN_WINDOW = 24
_ROW_WINDOW = 512  # channels per assignment on axes that are only rows
_CHUNK = 1 << 22  # elements per temporary
_REL_TOL = 1e-12  # a region's permutation must raise the exact kept importance by more than this (relative)


# ----------------------------------------------------------------------------------------------------------------
# masks and their statistics


def kept_importance(importance: torch.Tensor, spec: VNMSpec) -> float:
    """Total importance kept by the best V:N:M mask of `importance` [R, K] (absolute values, as vnm_mask scores)."""
    imp = importance.detach().float().abs()
    rows, cols = imp.shape
    columns, positions = vnm_mask(imp, spec)
    _, kp = spec.padded_shape(rows, cols)
    padded = nn.functional.pad(imp, (0, kp - cols))
    return float(torch.gather(padded, 1, kept_column_index(columns, positions, spec)).double().sum())


def _choose(blk: torch.Tensor, spec: VNMSpec) -> torch.Tensor:
    """Index into column_subsets(M) of the best 4 columns of every block, long [Kb, Rb], for blocks given channel-major
    as blk [Kb, M, Rb, V]: the same exhaustive choice and tie-break as vnm_mask (a subset must score strictly more
    than every earlier one), without the 2:4 positions that the search never needs."""
    kb, m, rb, v = blk.shape
    if m == 4:
        return torch.zeros(kb, rb, dtype=torch.long)
    first, second, pairs = _subset_pairs(m)
    first, second = first.tolist(), second.tolist()
    out = torch.empty(kb, rb, dtype=torch.long)
    step = max(1, (1 << 21) // max(1, m * rb * v))
    for g0 in range(0, kb, step):
        part = blk[g0:g0 + step]
        cols = part.unbind(1)
        psum = [cols[i] + cols[j] for i, j in pairs]
        pmax = [torch.maximum(cols[i], cols[j]) for i, j in pairs]
        top = choice = None
        for c, (f, s) in enumerate(zip(first, second)):
            score = torch.maximum(pmax[f] + pmax[s], torch.maximum(psum[f], psum[s])).sum(-1)
            if top is None:
                top, choice = score, torch.zeros(score.shape, dtype=torch.long)
            else:
                better = score > top
                top = torch.where(better, score, top)
                choice = torch.where(better, c, choice)
        out[g0:g0 + step] = choice
    return out


def _sorted4(a, b, c, d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest, second and third largest of 4 tensors, elementwise (a sorting network)."""
    hi1, lo1 = torch.maximum(a, b), torch.minimum(a, b)
    hi2, lo2 = torch.maximum(c, d), torch.minimum(c, d)
    mid1, mid2 = torch.minimum(hi1, hi2), torch.maximum(lo1, lo2)
    return torch.maximum(hi1, hi2), torch.maximum(mid1, mid2), torch.minimum(mid1, mid2)


def _top2_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum of the 2 largest of the 4 entries on `dim`."""
    a, b, c, d = x.unbind(dim)
    return torch.maximum(torch.maximum(a, b) + torch.maximum(c, d), torch.maximum(a + b, c + d))


def _column_context(sub: torch.Tensor, spec: VNMSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a channel placed in each column would keep, the rest unchanged, for a channel-major padded importance
    sub [Kp, Rp] (row k = column k of the matrix).

    Returns thr [Kp, Rp]: the value the newcomer must beat in each row (where the column is one of its block's 4
    selected columns: the second largest of the 3 others, as the row keeps its top 2 of 4; elsewhere the same after
    the block gives up its cheapest selected column), base [Kp, Rb]: 0 for selected columns, minus the importance
    lost by that cheapest swap otherwise, and the kept importance of every M-group, float64 [Kb]."""
    v, m = spec.v, spec.m
    kp, rp = sub.shape
    kb, rb = kp // m, rp // v
    blk = sub.view(kb, m, rb, v)
    columns = column_subsets(m)[_choose(blk, spec)].transpose(1, 2)  # [Kb, 4, Rb]
    index = columns[..., None].expand(kb, 4, rb, v)
    values = torch.gather(blk, 1, index)  # [Kb, 4, Rb, V]
    first, second, third = _sorted4(*values.unbind(1))
    kept = (first + second).sum((1, 2)).double()
    top = values >= second[:, None]  # kept by 2:4 (ties change neither thr nor loss)
    thr_sel = torch.where(top, third[:, None], second[:, None])
    if m == 4:
        thr = torch.empty_like(blk).scatter_(1, index, thr_sel)
        return thr.view(kp, rp), torch.zeros(kp, rb), kept
    loss = ((values - third[:, None]) * top).sum(-1)  # [Kb, 4, Rb]: what giving up each selected column costs
    drop = loss.argmin(1)  # [Kb, Rb] (min with indices is very slow on small CPU tensors in some torch builds)
    best_loss = torch.gather(loss, 1, drop[:, None]).squeeze(1)
    drop_top = torch.gather(top, 1, drop[:, None, :, None].expand(kb, 1, rb, v)).squeeze(1)
    thr = torch.where(drop_top, third, second)[:, None].expand(kb, m, rb, v).contiguous()
    thr.scatter_(1, index, thr_sel)
    base = (-best_loss)[:, None].expand(kb, m, rb).contiguous()
    base.scatter_(1, columns, 0.0)
    return thr.view(kp, rp), base.view(kp, rb), kept


def _block_kept(blk: torch.Tensor, spec: VNMSpec) -> torch.Tensor:
    """Importance kept in every block of channel-major blocks blk [Kb, M, Rb, V], float64 [Kb, Rb]."""
    kb, m, rb, v = blk.shape
    out = torch.empty(kb, rb, dtype=torch.float64)
    step = max(1, _CHUNK // max(1, m * rb * v))
    for g0 in range(0, kb, step):
        part = blk[g0:g0 + step]
        columns = column_subsets(m)[_choose(part, spec)].transpose(1, 2)  # [kb, 4, Rb]
        values = torch.gather(part, 1, columns[..., None].expand(-1, 4, rb, v))
        out[g0:g0 + step] = _top2_sum(values, 1).sum(-1).double()
    return out


def _column_cost(x: torch.Tensor, thr: torch.Tensor, base: torch.Tensor, v: int) -> torch.Tensor:
    """cost[i, k] = sum over V-blocks b of relu(base[k, b] + sum_{r in b} relu(x[i, r] - thr[k, r])).

    Channel-major: x, thr [W, nb*V], base [W, nb]."""
    w, nb = base.shape
    xb, tb = x.view(w, nb, v), thr.view(w, nb, v)
    cost = torch.zeros(w, w)
    step = max(1, _CHUNK // (v * w * w))
    for i in range(0, nb, step):
        d = (xb[:, None, i:i + step] - tb[None, :, i:i + step]).clamp_min_(0).sum(-1)  # [channel, slot, blocks]
        cost += d.add_(base[None, :, i:i + step]).clamp_min_(0).sum(-1)
    return cost


def _row_cost(y: torch.Tensor, columns: torch.Tensor, m: int) -> torch.Tensor:
    """Importance each row of y [W, Kb*M] keeps in each block whose selected columns are `columns` [nB, Kb, 4]."""
    w = y.shape[0]
    nb, kb, _ = columns.shape
    yb = y.view(w, 1, kb, m)
    out = torch.empty(w, nb)
    step = max(1, _CHUNK // max(1, nb * kb * 4))
    for i in range(0, w, step):
        part = yb[i:i + step]
        g = torch.gather(part.expand(-1, nb, -1, -1), 3, columns[None].expand(part.shape[0], -1, -1, -1))
        out[i:i + step] = _top2_sum(g).sum(-1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the search on one channel axis


def _members(units: torch.Tensor, size: int, limit: int) -> torch.Tensor:
    """Indices of the given units (runs of `size` consecutive indices), cut at `limit`."""
    members = (units[:, None] * size + torch.arange(size)).flatten()
    return members[members < limit]


def _sample(n_units: int, keep: int, gen: torch.Generator) -> torch.Tensor | None:
    """A sorted random subset of `keep` of `n_units` units, or None for all."""
    if keep >= n_units:
        return None
    return torch.randperm(n_units, generator=gen)[:max(1, keep)].sort().values


@dataclass
class _Use:
    """A matrix that sees the axis: dim 1 = as input columns, dim 0 = as output rows. `data` is the search's private
    |importance| copy, channel-major and zero-padded on its other dimension ([K, Rp] for columns, [R, Kp] for rows,
    float32), permuted as the search goes. index [L, c]: the matrix channel of each axis position (c > 1 when a
    channel appears several times, e.g. in o_proj once per query head of a KV group)."""

    data: torch.Tensor
    dim: int
    index: torch.Tensor

    @classmethod
    def of(cls, importance: torch.Tensor, dim: int, index: torch.Tensor, spec: VNMSpec) -> "_Use":
        imp = importance.detach().float().abs()
        rp, kp = spec.padded_shape(*imp.shape)
        if dim == 1:
            data = nn.functional.pad(imp.t(), (0, rp - imp.shape[0])).contiguous()
        else:
            data = nn.functional.pad(imp, (0, kp - imp.shape[1])).contiguous()
        return cls(data, dim, index)


class _ColumnState:
    """A matrix seen as columns: exact kept importance per M-group, and the cost context (thresholds) of every column
    on the rows sampled for the current pass, kept up to date as channels move."""

    def __init__(self, use: _Use, spec: VNMSpec):
        self.use, self.spec = use, spec
        self.c, self.rp = use.data.shape
        self.kb = -(-self.c // spec.m)
        self.kept = torch.empty(self.kb, dtype=torch.float64)
        self.rows = self.sampled = None  # sampled row indices and data[:, rows] (None: all rows)
        self.thr = self.base = None  # built by resample(), which the search calls before anything else

    @property
    def cost_rows(self) -> int:
        return self.rp * self.use.index.shape[1]

    def units(self, mi: torch.Tensor) -> torch.Tensor:
        return torch.unique(mi.flatten() // self.spec.m)

    def _sub(self, groups: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        sub = data[_members(groups, self.spec.m, self.c)]
        return nn.functional.pad(sub, (0, 0, 0, len(groups) * self.spec.m - sub.shape[0]))

    def resample(self, max_rows: int, gen: torch.Generator) -> None:
        """Choose this pass's rows (whole V-blocks) and build every column's context on them."""
        blocks = _sample(self.rp // self.spec.v, max_rows // self.spec.v, gen)
        first = self.thr is None
        if not first and blocks is None and self.rows is None:
            return
        self.rows = None if blocks is None else _members(blocks, self.spec.v, self.rp)
        self.sampled = None if blocks is None else self.use.data[:, self.rows].contiguous()
        n = self.rp if self.rows is None else len(self.rows)
        self.thr = torch.empty(self.kb * self.spec.m, n)
        self.base = torch.empty(self.kb * self.spec.m, n // self.spec.v)
        for chunk in torch.arange(self.kb).split(max(1, _CHUNK // (n * self.spec.m))):
            self.refresh(chunk)
        if first and self.rows is not None:
            self.exact(torch.arange(self.kb))

    def apply(self, mi: torch.Tensor, order: torch.Tensor) -> None:
        """Slot k of the window `mi` receives the channel that was at slot order[k]."""
        dst, src = mi.flatten(), mi[order].flatten()
        self.use.data[dst] = self.use.data[src]
        if self.sampled is not None:
            self.sampled[dst] = self.sampled[src]

    def refresh(self, groups: torch.Tensor) -> None:
        data = self.use.data if self.sampled is None else self.sampled
        thr, base, kept = _column_context(self._sub(groups, data), self.spec)
        cols = (groups[:, None] * self.spec.m + torch.arange(self.spec.m)).flatten()
        self.thr[cols] = thr
        self.base[cols] = base
        if self.rows is None:
            self.kept[groups] = kept

    def exact(self, groups: torch.Tensor) -> float:
        """Exact kept importance of the groups (recomputed on all rows when contexts use a sample)."""
        if self.rows is not None:
            for chunk in groups.split(max(1, _CHUNK // (self.rp * self.spec.m))):
                blk = self._sub(chunk, self.use.data).view(len(chunk), self.spec.m, -1, self.spec.v)
                self.kept[chunk] = _block_kept(blk, self.spec).sum(1)
        return float(self.kept[groups].sum())

    def cost(self, mi: torch.Tensor) -> torch.Tensor:
        w = mi.shape[0]
        data = self.use.data if self.sampled is None else self.sampled
        cost = torch.zeros(w, w)
        for j in range(mi.shape[1]):
            idx = mi[:, j]
            cost += _column_cost(data[idx], self.thr[idx], self.base[idx], self.spec.v)
        return cost


class _RowState:
    """A matrix seen as rows: exact kept importance per V-block, and every block's selected columns on the M-groups
    sampled for the current pass, kept up to date as channels move."""

    cost_rows = 0

    def __init__(self, use: _Use, spec: VNMSpec):
        self.use, self.spec = use, spec
        self.r, self.kp = use.data.shape
        self.rb = -(-self.r // spec.v)
        self.kept = torch.empty(self.rb, dtype=torch.float64)
        self.groups = self.sampled = None  # sampled M-groups and data[:, their columns] (None: all)
        self.columns = None  # built by resample(), which the search calls before anything else

    def units(self, mi: torch.Tensor) -> torch.Tensor:
        return torch.unique(mi.flatten() // self.spec.v)

    def _blocks(self, blocks: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Channel-major blocks [Kb, M, nB, V] of the given V-blocks of `data`."""
        v, m = self.spec.v, self.spec.m
        sub = data[_members(blocks, v, self.r)]
        sub = nn.functional.pad(sub, (0, 0, 0, len(blocks) * v - sub.shape[0]))
        return sub.view(len(blocks), v, -1, m).permute(2, 3, 0, 1).contiguous()

    def resample(self, max_cols: int, gen: torch.Generator) -> None:
        """Choose this pass's columns (whole M-groups) and every block's selection on them."""
        groups = _sample(self.kp // self.spec.m, max_cols // self.spec.m, gen)
        first = self.columns is None
        if not first and groups is None and self.groups is None:
            return
        self.groups = groups
        self.sampled = None if groups is None else self.use.data[:, _members(groups, self.spec.m, self.kp)].contiguous()
        kb = self.kp // self.spec.m if groups is None else len(groups)
        self.columns = torch.empty(self.rb, kb, 4, dtype=torch.long)
        for chunk in torch.arange(self.rb).split(max(1, _CHUNK // (kb * self.spec.m * self.spec.v))):
            self.refresh(chunk)
        if first and self.groups is not None:
            self.exact(torch.arange(self.rb))

    def apply(self, mi: torch.Tensor, order: torch.Tensor) -> None:
        dst, src = mi.flatten(), mi[order].flatten()
        self.use.data[dst] = self.use.data[src]
        if self.sampled is not None:
            self.sampled[dst] = self.sampled[src]

    def refresh(self, blocks: torch.Tensor) -> None:
        blk = self._blocks(blocks, self.use.data if self.sampled is None else self.sampled)
        kb, _, nb, v = blk.shape
        columns = column_subsets(self.spec.m)[_choose(blk, self.spec)]  # [Kb, nB, 4]
        self.columns[blocks] = columns.transpose(0, 1)
        if self.groups is None:
            values = torch.gather(blk, 1, columns.transpose(1, 2)[..., None].expand(kb, 4, nb, v))
            self.kept[blocks] = _top2_sum(values, 1).sum((0, 2)).double()

    def exact(self, blocks: torch.Tensor) -> float:
        if self.groups is not None:
            for chunk in blocks.split(max(1, _CHUNK // (self.kp * self.spec.v))):
                self.kept[chunk] = _block_kept(self._blocks(chunk, self.use.data), self.spec).sum(0)
        return float(self.kept[blocks].sum())

    def cost(self, mi: torch.Tensor) -> torch.Tensor:
        """Each row costed against each block's current selection: a lower bound, exact at the identity."""
        w = mi.shape[0]
        data = self.use.data if self.sampled is None else self.sampled
        cost = torch.zeros(w, w)
        for j in range(mi.shape[1]):
            block = mi[:, j] // self.spec.v
            unique = torch.unique(block)
            rc = _row_cost(data[mi[:, j]], self.columns[unique], self.spec.m)  # [W, blocks of the window]
            cost += rc[:, torch.searchsorted(unique, block)]
        return cost


def _window(states: list, positions: torch.Tensor) -> torch.Tensor | None:
    """Reassign the channels at `positions` among themselves by a linear assignment on the summed costs. Returns the
    order applied (slot k now holds the channel that was at positions[order[k]]), or None if nothing moved."""
    from scipy.optimize import linear_sum_assignment

    w = len(positions)
    mis = [s.use.index[positions] for s in states]
    cost = sum(s.cost(mi) for s, mi in zip(states, mis)).double()
    if not bool(torch.isfinite(cost).all()):
        return None
    _, slot = linear_sum_assignment(cost.numpy(), maximize=True)
    slot = torch.as_tensor(slot, dtype=torch.long)
    order = torch.empty_like(slot)
    order[slot] = torch.arange(w)
    moved = order != torch.arange(w)
    if not bool(moved.any()):
        return None
    for s, mi in zip(states, mis):
        s.apply(mi, order)
        s.refresh(s.units(mi[moved]))
    return order


def _regions(states: list, length: int, spec: VNMSpec, width: int,
             gen: torch.Generator) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Random regions of the axis and their windows (see the module docstring)."""
    rowwise = any(s.use.dim == 0 for s in states)
    colwise = [s for s in states if s.use.dim == 1]
    if rowwise:
        unit = spec.v
        per_region = max(1, round(width * (spec.m if colwise else 1) / spec.v))
    else:
        unit, per_region = spec.m, max(1, width)
    n_units = -(-length // unit)
    shuffled = torch.randperm(n_units, generator=gen)
    regions = [_members(c.sort().values, unit, length) for c in shuffled.split(per_region)]
    if not colwise:
        return [(pos, [pos]) for pos in regions]
    # M-group of every position in every column matrix (one key per matrix and copy)
    keys = torch.cat([s.use.index // spec.m + (i << 40) for i, s in enumerate(colwise)], dim=1)  # [L, n]
    simple = all(s.use.index.shape[1] == 1 and torch.equal(s.use.index[:, 0], torch.arange(length)) for s in colwise)
    out = []
    for pos in regions:
        windows = []
        if simple:  # the t-th member (in a random order) of every group forms window t
            shuffled = pos[torch.randperm(len(pos), generator=gen)]
            pos = shuffled[torch.sort(shuffled // spec.m, stable=True).indices]
            group = pos // spec.m
            new = torch.ones_like(group, dtype=torch.bool)
            new[1:] = group[1:] != group[:-1]
            start = torch.cummax(torch.where(new, torch.arange(len(pos)), 0), 0).values
            rank = torch.arange(len(pos)) - start
            for t in range(int(rank.max()) + 1):
                windows.extend(pos[rank == t].split(width))
        else:  # greedy: each position joins the first window that has none of its groups yet
            bins: list[tuple[list[int], set]] = []
            for p in pos[torch.randperm(len(pos), generator=gen)].tolist():
                k = set(keys[p].tolist())
                for members, used in bins:
                    if len(members) < width and not k & used:
                        members.append(p)
                        used |= k
                        break
                else:
                    bins.append(([p], k))
            windows = [torch.tensor(sorted(members)) for members, _ in bins]
        out.append((pos, windows))
    return out


def _region(states: list, region: torch.Tensor, windows: list[torch.Tensor], perm: torch.Tensor, strict: bool) -> bool:
    """Run a region's windows; keep the result only if the exact kept importance of everything the region touches went
    up (and, if strict, went down for no matrix), else undo it. True if kept."""
    touched = [s.units(s.use.index[region]) for s in states]
    olds = [float(s.kept[u].sum()) for s, u in zip(states, touched)]
    old = sum(olds)
    start = perm[region].clone()
    for positions in windows:
        if len(positions) > 1:
            order = _window(states, positions)
            if order is not None:
                perm[positions] = perm[positions[order]]
    if torch.equal(perm[region], start):
        return False
    news = [s.exact(u) for s, u in zip(states, touched)]
    new = sum(news)
    fair = not strict or all(n >= o - _REL_TOL * abs(o) for n, o in zip(news, olds))
    if fair and new > old + _REL_TOL * abs(old):
        return True
    current = perm[region]
    sorter = current.argsort()
    back = sorter[torch.searchsorted(current[sorter], start)]
    for s, u in zip(states, touched):
        s.apply(s.use.index[region], back)
        s.refresh(u)
        s.exact(u)
    perm[region] = start
    return False


def _search(uses: list[_Use], length: int, spec: VNMSpec, passes: int, seed: int,
            strict: bool = False) -> tuple[torch.Tensor, float, float]:
    """Permutation of an axis (new channel i = old channel perm[i]) after up to `passes` passes, and the total
    importance kept before and after (exact). The uses' data are left permuted; the identity if nothing helped.
    strict: a region's permutation is kept only if no single matrix loses kept importance (not just the sum)."""
    perm = torch.arange(length)
    if length < 2 or not uses:
        return perm, 0.0, 0.0
    gen = torch.Generator().manual_seed(seed)
    states = [(_ColumnState if u.dim == 1 else _RowState)(u, spec) for u in uses]
    cost_rows = sum(s.cost_rows for s in states)
    width, share = _ROW_WINDOW, 1.0
    if cost_rows:
        width = min(_MAX_WINDOW, _COST_ELEMENTS // max(1, length * cost_rows))
        if width < _MIN_WINDOW:
            width = _MIN_WINDOW
            share = _COST_ELEMENTS / (length * width * cost_rows)
    blocks_per_window = max(1, round(width * spec.m / spec.v)) if cost_rows else max(1, width // spec.v)
    max_cols = spec.m * max(1, int(_COST_ELEMENTS // max(1, 4 * length * blocks_per_window)))
    before = None
    for _ in range(max(1, passes)):
        for s in states:
            if isinstance(s, _ColumnState):
                s.resample(max(spec.v, int(share * s.rp)), gen)
            else:
                s.resample(max_cols, gen)
        if before is None:
            before = sum(float(s.kept.sum()) for s in states)
            if passes < 1:
                break
        improved = 0
        for region, windows in _regions(states, length, spec, width, gen):
            improved += _region(states, region, windows, perm, strict)
        if not improved:
            break
    after = sum(float(s.kept.sum()) for s in states)
    if not after > before:
        return torch.arange(length), before, before
    return perm, before, after


def _check(importances: list[torch.Tensor], dim: int) -> int:
    if not importances:
        raise ValueError("need at least one importance matrix")
    if any(t.dim() != 2 for t in importances) or len({int(t.shape[dim]) for t in importances}) != 1:
        raise ValueError(f"importance matrices must be 2-D and share dimension {dim}, got "
                         f"{[tuple(t.shape) for t in importances]}")
    return int(importances[0].shape[dim])


def search_permutation(inputs: list[torch.Tensor], outputs: list[torch.Tensor], spec: VNMSpec,
                       iterations: int = 2, seed: int = 0) -> torch.Tensor:
    """Permutation p (LongTensor [K]) of a channel axis that is the input (columns) of `inputs` [R_i, K] and the output
    (rows) of `outputs` [K, C_j], raising sum_i kept_importance(inputs[i][:, p]) + sum_j kept_importance(outputs[j][p])
    as far as `iterations` passes get; the identity when nothing helps. The tensors are not modified."""
    length = _check(list(inputs) + [t.t() for t in outputs], 1)
    ident = torch.arange(length)[:, None]
    uses = [_Use.of(t, 1, ident, spec) for t in inputs] + [_Use.of(t, 0, ident, spec) for t in outputs]
    return _search(uses, length, spec, iterations, seed)[0]


def search_input_permutation(importances: list[torch.Tensor], spec: VNMSpec, iterations: int = 2,
                             seed: int = 0) -> torch.Tensor:
    """Permutation p of the K input channels of matrices [R_i, K] such that sum_i kept_importance(imp_i[:, p]) is as
    high as found: never lower than the identity's, which is returned when the search does not improve."""
    return search_permutation(list(importances), [], spec, iterations, seed)


def search_output_permutation(importances: list[torch.Tensor], spec: VNMSpec, iterations: int = 2,
                              seed: int = 0) -> torch.Tensor:
    """Permutation p of the R output channels (rows) of matrices [R, K_i], i.e. which rows share a V-row block,
    such that sum_i kept_importance(imp_i[p]) is as high as found (the identity when nothing helps)."""
    return search_permutation([], list(importances), spec, iterations, seed)


# ----------------------------------------------------------------------------------------------------------------
# folding permutations into a model


@dataclass
class GroupResult:
    """One foldable channel permutation and the importance kept by the layers whose objective it optimised, summed
    (before = at the start of permute_model, after = at its end; gain = what its own search steps added)."""

    name: str
    kind: str  # "residual", "mlp", "attn_vo" or "attn_qk"
    size: int
    layers: list[str]
    before: float = 0.0
    after: float = 0.0
    gain: float = 0.0
    applied: bool = False


@dataclass
class PermutationReport:
    """What permute_model did. `importance` is the input dict permuted like the weights; `layers` maps each Linear
    with importance to (kept before, kept after); `skipped` lists (layer or group, reason) for every permutation that
    was not folded; `permutations` holds each applied group's permutation (new channel i = old channel p[i])."""

    spec: str
    importance: dict[str, torch.Tensor]
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    groups: list[GroupResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)
    output_permutation: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def kept_before(self) -> float:
        return sum(b for b, _ in self.layers.values())

    @property
    def kept_after(self) -> float:
        return sum(a for _, a in self.layers.values())

    def to_dict(self) -> dict:
        """JSON-ready summary (no tensors), e.g. for the artifact manifest."""
        return {
            "spec": self.spec,
            "seconds": round(self.seconds, 3),
            "kept_before": self.kept_before,
            "kept_after": self.kept_after,
            "layers": {n: {"kept_before": b, "kept_after": a} for n, (b, a) in self.layers.items()},
            "groups": [{"name": g.name, "kind": g.kind, "size": g.size, "applied": g.applied, "kept_before": g.before,
                        "kept_after": g.after, "gain": g.gain} for g in self.groups],
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
            "output_permuted": self.output_permutation is not None,
        }

    def summary(self) -> str:
        """One line per Linear (kept importance without -> with permutation), then the skipped groups."""
        lines = [f"channel permutation for {self.spec}: importance kept {self.kept_before:.6g} -> "
                 f"{self.kept_after:.6g} ({_ratio(self.kept_after, self.kept_before)}) in {self.seconds:.1f} s"]
        for name, (b, a) in self.layers.items():
            lines.append(f"  {name}: {b:.6g} -> {a:.6g} ({_ratio(a, b)})")
        for name, reason in self.skipped:
            lines.append(f"  skipped {name}: {reason}")
        return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.2f}%" if b else "n/a"


@dataclass
class _Fold:
    """A channel axis of `length` channels and everything that must follow its permutation: Linear weights along
    their input (`cols`) or output (`rows`, with their bias) dimension, and other parameters (`extra`: norms,
    embeddings). Every index is [length, c]: the tensor positions of each channel."""

    name: str
    kind: str
    length: int
    cols: list[tuple[str, torch.Tensor]]
    rows: list[tuple[str, torch.Tensor]]
    extra: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)  # (parameter name, dim, index)


def _ar(n: int, offset: int = 0) -> torch.Tensor:
    return (torch.arange(n) + offset)[:, None]


def _llama_folds(model: nn.Module) -> tuple[list[_Fold], list[tuple[str, str]]]:
    c = model.config
    d, kv, heads = c.head_dim, c.num_key_value_heads, c.num_attention_heads
    per_kv = heads // kv
    folds, skipped = [], []
    hidden, inter = _ar(c.hidden_size), _ar(c.intermediate_size)
    cols, rows = [], []
    extra = [("model.embed_tokens.weight", 1, hidden), ("model.norm.weight", 0, hidden)]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        cols += [(attn + n, hidden) for n in ("q_proj", "k_proj", "v_proj")]
        cols += [(mlp + n, hidden) for n in ("gate_proj", "up_proj")]
        rows += [(attn + "o_proj", hidden), (mlp + "down_proj", hidden)]
        extra += [(p + n + "_layernorm.weight", 0, hidden) for n in ("input", "post_attention")]
        folds.append(_Fold(mlp[:-1], "mlp", c.intermediate_size, [(mlp + "down_proj", inter)],
                           [(mlp + "gate_proj", inter), (mlp + "up_proj", inter)]))
        for j in range(kv):
            o_index = torch.stack([torch.arange(d) + h * d for h in range(j * per_kv, (j + 1) * per_kv)], dim=1)
            folds.append(_Fold(f"{attn}kv_head{j}", "attn_vo", d, [(attn + "o_proj", o_index)],
                               [(attn + "v_proj", _ar(d, j * d))]))
        skipped.append((attn + "q_proj/k_proj", "RoPE rotates the row pair (i, i + head_dim/2) at a frequency that "
                        "depends on i, so permuting q/k rows within a head changes the attention scores"))
    cols.append(("lm_head", hidden))
    folds.insert(0, _Fold("residual", "residual", c.hidden_size, cols, rows, extra))
    return folds, skipped


def _bert_folds(model: nn.Module, allow_output_permutation: bool) -> tuple[list[_Fold], list[tuple[str, str]]]:
    c = model.config
    h, d = c.hidden_size, c.head_dim
    folds, skipped = [], []
    cols, rows = [], []
    extra = [(f"embeddings.{e}_embeddings.weight", 1, _ar(h)) for e in ("word", "position", "token_type")]
    extra += [("embeddings.LayerNorm.weight", 0, _ar(h)), ("embeddings.LayerNorm.bias", 0, _ar(h))]
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        att = p + "attention."
        cols += [(att + "self.query", _ar(h)), (att + "self.key", _ar(h)), (att + "self.value", _ar(h)),
                 (p + "intermediate.dense", _ar(h))]
        rows += [(att + "output.dense", _ar(h)), (p + "output.dense", _ar(h))]
        extra += [(f"{q}LayerNorm.{w}", 0, _ar(h)) for q in (att + "output.", p + "output.")
                  for w in ("weight", "bias")]
        folds.append(_Fold(p + "intermediate", "mlp", c.intermediate_size,
                           [(p + "output.dense", _ar(c.intermediate_size))],
                           [(p + "intermediate.dense", _ar(c.intermediate_size))]))
        for j in range(c.num_attention_heads):
            folds.append(_Fold(f"{att}self.head{j}.value", "attn_vo", d, [(att + "output.dense", _ar(d, j * d))],
                               [(att + "self.value", _ar(d, j * d))]))
            folds.append(_Fold(f"{att}self.head{j}.query_key", "attn_qk", d, [],
                               [(att + "self.query", _ar(d, j * d)), (att + "self.key", _ar(d, j * d))]))
    if allow_output_permutation:
        folds.insert(0, _Fold("residual", "residual", h, cols, rows, extra))
    else:
        skipped.append(("residual", "BertModel returns the residual stream itself (last hidden state), so a hidden-"
                        "channel permutation would reorder its output; pass allow_output_permutation=True to "
                        "permute it anyway"))
    return folds, skipped


def _targets(model: nn.Module, fold: _Fold) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    """Every parameter the fold permutes, once each, checked against the fold's sizes; raises ValueError naming the
    layer that does not fit."""
    modules, params = dict(model.named_modules()), dict(model.named_parameters(remove_duplicate=False))
    out, seen = [], set()

    def add(param: nn.Parameter | None, dim: int, index: torch.Tensor, name: str) -> None:
        if param is None:
            return
        if index.numel() and (param.dim() <= dim or int(index.max()) >= param.shape[dim]):
            raise ValueError(f"{name} has shape {tuple(param.shape)}, which does not fit this permutation")
        key = (id(param), dim)
        if key not in seen:
            seen.add(key)
            out.append((param, dim, index))

    for lists, dim in ((fold.cols, 1), (fold.rows, 0)):
        for name, index in lists:
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                kind = "missing" if module is None else f"a {type(module).__name__}, not a dense nn.Linear"
                raise ValueError(f"{name} is {kind}")
            add(module.weight, dim, index, name)
            if dim == 0:
                add(module.bias, 0, index, name + ".bias")
    for name, dim, index in fold.extra:
        if name not in params:
            raise ValueError(f"{name} is missing")
        add(params[name], dim, index, name)
    return out


def _permute_along(t: torch.Tensor, dim: int, index: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t with the positions index[k] along dim taking the values at index[perm[k]] (a new tensor)."""
    dst, src = index.flatten().to(t.device), index[perm].flatten().to(t.device)
    return t.index_copy(dim, dst, t.index_select(dim, src))


def permute_model(model: nn.Module, importance: dict[str, torch.Tensor], spec: VNMSpec, iterations: int = 2,
                  seed: int = 0, allow_output_permutation: bool = False, strict: bool = False,
                  on_step: Callable[[int, int], None] | None = None) -> PermutationReport:
    """Permute `model`'s channels in place, where the permutation folds into neighbouring layers, to raise the
    importance kept by V:N:M pruning; the model's function is unchanged (BERT's output channels are reordered only
    with allow_output_permutation=True). `importance` maps Linear names to tensors shaped like their weights; the
    report carries them permuted like the weights (so scores computed before stay valid), the kept importance per
    Linear before/after, and every permutation that was skipped with its reason. Never raises on a model it cannot
    handle: it skips and says why (logged on one line per reason).

    Each of `iterations` rounds runs one search pass on every group in turn (residual stream, then per layer the MLP
    and attention groups), so input and output permutations alternate. A group's objective is the sum of the kept
    importance of its layers; strict=True also refuses any step that lowers a single layer (no layer can end below
    where it started, but the residual stream, shared by every layer, then rarely moves). `on_step(done, total)`
    reports the group steps finished so far (for progress bars)."""
    t0 = time.perf_counter()
    report = PermutationReport(str(spec), {k: v for k, v in importance.items()})
    modules = dict(model.named_modules())
    work: dict[str, torch.Tensor] = {}
    for name, imp in importance.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            report.skipped.append((name, "importance given for something that is not a dense nn.Linear of this model; "
                                         "left as is"))
        elif tuple(imp.shape) != tuple(module.weight.shape):
            report.skipped.append((name, f"importance shape {tuple(imp.shape)} differs from the weight's "
                                         f"{tuple(module.weight.shape)}; its layer is left out"))
        else:
            work[name] = imp.detach().float().abs().cpu()
    arch = type(model).__name__
    try:
        if arch == "LlamaForCausalLM":
            folds, skipped = _llama_folds(model)
        elif arch == "BertModel":
            folds, skipped = _bert_folds(model, allow_output_permutation)
        else:
            folds, skipped = [], [("model", f"no channel permutation rules for {arch}")]
    except Exception as e:  # a config the rules do not understand
        folds, skipped = [], [("model", f"could not derive the permutation groups: {e}")]
    report.skipped += skipped
    report.layers = {n: (kept_importance(t, spec), 0.0) for n, t in work.items()}

    live: list[tuple[_Fold, list, GroupResult]] = []
    for fold in folds:
        layers = [n for n, _ in fold.cols + fold.rows]
        result = GroupResult(fold.name, fold.kind, fold.length, layers)
        try:
            targets = _targets(model, fold)
        except Exception as e:
            report.skipped.append((fold.name, f"cannot fold: {e}"))
            continue
        if not any(n in work for n in layers):
            report.skipped.append((fold.name, "no importance given for any of its layers"))
            continue
        if fold.length < 2:
            continue
        result.before = sum(report.layers[n][0] for n in set(layers) if n in work)
        live.append((fold, targets, result))
        report.groups.append(result)

    failed: set[str] = set()
    total, done = max(0, iterations) * len(live), 0
    for it in range(max(0, iterations)):
        for k, (fold, targets, result) in enumerate(live):
            if on_step is not None:
                on_step(done, total)
            done += 1
            if fold.name in failed:
                continue
            try:
                uses = [_Use.of(work[n], 1, index, spec) for n, index in fold.cols if n in work]
                uses += [_Use.of(work[n], 0, index, spec) for n, index in fold.rows if n in work]
                perm, before, after = _search(uses, fold.length, spec, 1, seed * 1_000_003 + it * 7919 + k, strict)
                if not after > before:
                    continue
                new_params = [(p, _permute_along(p.data, dim, index, perm)) for p, dim, index in targets]
                updates = {}
                for names, dim in ((fold.cols, 1), (fold.rows, 0)):
                    for n, index in names:
                        if n in work:
                            updates[n] = (dim, index)
            except Exception as e:  # nothing of this step has been applied yet
                failed.add(fold.name)
                done = " beyond its earlier steps" if result.applied else ""
                report.skipped.append((fold.name, f"search failed ({type(e).__name__}: {e}); not permuted{done}"))
                continue
            with torch.no_grad():
                for p, new in new_params:
                    p.data.copy_(new)
            for n, (dim, index) in updates.items():
                work[n] = _permute_along(work[n], dim, index, perm)
                report.importance[n] = _permute_along(report.importance[n], dim, index, perm)
            prev = report.permutations.get(fold.name)
            report.permutations[fold.name] = perm if prev is None else prev[perm]
            result.gain += after - before
            result.applied = True

    if on_step is not None:
        on_step(total, total)
    report.layers = {n: (b, kept_importance(work[n], spec)) for n, (b, _) in report.layers.items()}
    for result in report.groups:
        result.after = sum(report.layers[n][1] for n in set(result.layers) if n in work)
    if allow_output_permutation and "residual" in report.permutations and arch == "BertModel":
        report.output_permutation = report.permutations["residual"]
    _log_skipped(report.skipped)
    report.seconds = time.perf_counter() - t0
    return report


def _log_skipped(skipped: list[tuple[str, str]]) -> None:
    """One log line per distinct reason, naming the layers."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        level = logging.WARNING if reason.startswith(("search failed", "cannot fold")) else logging.INFO
        log.log(level, "channel permutation skipped for %s: %s", shown, reason)
