"""SLoRB (Sparse Low-Rank Boosting, from the AST paper): a small dense branch next to a V:N:M-sparse Linear.

The branch adds `S @ X_g` to the sparse Linear's output, where `X_g[..., g]` is the sum of the inputs of group g
(`group` consecutive input channels) and `S` is `[out_features, ceil(in_features / group)]`. It gives back some of
what pruning removed at `1/group` of the dense weight's parameters (group 16 adds 6.25% of a dense matrix; the AST
paper quotes 12.5% of a 2:4 matrix's stored values).

Initialisation: `S[i, g]` is the mean of row i's *pruned* weights over group g (kept positions count as zero). That
is the least-squares best group-constant approximation of the pruned part `W * (1 - mask)`, so right after
initialisation `W * mask + S expanded` is the closest such model to the dense weight.

During training the branch is the `slorb` submodule of an ASTLinear (parameter `<module>.slorb.weight`, the name
`run_ast` returns it under). In a lowc artifact it is stored next to the module's packed tensors as `<module>.slorb`
(`[R, ceil(K / group)]`, the module's dense dtype), with the group size in the module's scheme
(`"slorb_group": k`); the runtime (`kernels.reference.packed_linear`) adds `group_sums(x, k) @ S.T` to the sparse
layer's output. See docs/AST.md and docs/FORMAT.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ...kernels.reference import group_count, group_sums  # the runtime's own definition


def slorb_apply(x: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    """The SLoRB branch's output `group_sums(x) @ weight.T` for inputs x [..., K] and weight [R, G]."""
    return torch.nn.functional.linear(group_sums(x, group), weight.to(x.dtype))


@torch.no_grad()
def slorb_init(weight: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    """Initial S [R, G]: per row and group, the mean of the pruned weights (kept entries count as zero).

    The last group divides by its true width, so S stays the least-squares fit when K is not a multiple of group.
    """
    rows, cols = weight.shape
    pruned = weight.float() * (~keep.bool()).float()
    sums = group_sums(pruned, group)
    width = group_sums(torch.ones(1, cols, device=weight.device), group)
    return (sums / width).to(weight.dtype)


class SLoRB(nn.Module):
    """The grouped dense branch as a module: `forward(x) = group_sums(x, group) @ weight.T`."""

    def __init__(self, out_features: int, in_features: int, group: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if group < 1:
            raise ValueError(f"SLoRB group size must be >= 1, got {group}")
        self.group, self.in_features, self.out_features = group, in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, group_count(in_features, group), dtype=dtype,
                                               device=device))

    @classmethod
    def from_pruned(cls, weight: torch.Tensor, keep: torch.Tensor, group: int) -> "SLoRB":
        """A branch initialised from a dense weight [R, K] and its keep mask (True = kept by V:N:M)."""
        branch = cls(weight.shape[0], weight.shape[1], group, dtype=weight.dtype, device=weight.device)
        branch.weight.data.copy_(slorb_init(weight, keep, group))
        return branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return slorb_apply(x, self.weight, self.group)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"


class SLoRBLinear(nn.Module):
    """A plain Linear plus a SLoRB branch: `base(x) + slorb_apply(x, weight, group)`, for evaluating a trained model
    in memory (benchmarks/ast_recovery.py). Artifacts need no wrapper: their packed modules carry the branch."""

    def __init__(self, base: nn.Module, weight: torch.Tensor, group: int):
        super().__init__()
        self.base, self.group = base, group
        self.register_buffer("slorb_weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + slorb_apply(x, self.slorb_weight, self.group)


__all__ = ["SLoRB", "SLoRBLinear", "slorb_apply", "slorb_init", "group_sums", "group_count"]
