"""Heuristic V and M selection (`--vnm auto --sparsity S`).

M follows from the sparsity (density 2/M). V trades accuracy for speed: larger V-row blocks share their kept
columns across more rows (faster sparse kernels, less freedom). Per layer type, lowc takes the largest V in
{16, 32, 64, 128} whose importance kept after V:N:M pruning is within `tolerance` (relative) of the best V's.
Until the sparse kernel's measured speed table exists this is the speed-agnostic form of the V:N:M paper's rule
(maximise accuracy under a speed constraint): prefer speed while it costs almost no importance.
"""

from __future__ import annotations

import logging
import re

import torch

from ...errors import UsageError
from .vnm import VNMSpec, vnm_mask, kept_column_index

V_CHOICES = (16, 32, 64, 128)
log = logging.getLogger("lowc.compress")


def m_for_sparsity(sparsity: float) -> int:
    """The M whose density 2/M is closest to 1 - sparsity."""
    if not 0.5 <= sparsity <= 0.875:
        raise UsageError(f"--sparsity: V:N:M reaches 0.5 (M=4) to 0.875 (M=16), got {sparsity}")
    return min(range(4, 17), key=lambda m: abs(2 / m - (1 - sparsity)))


def layer_type(name: str) -> str:
    """Module name with layer indices replaced by '*': model.layers.3.mlp.up_proj -> model.layers.*.mlp.up_proj."""
    return re.sub(r"\.\d+\.", ".*.", name)


def kept_fraction(importance: torch.Tensor, spec: VNMSpec) -> tuple[float, float]:
    """(importance kept, total importance) after the best V:N:M mask of `spec`."""
    columns, positions = vnm_mask(importance, spec)
    rows, cols = importance.shape
    padded = torch.nn.functional.pad(importance.float().abs(), (0, spec.padded_shape(rows, cols)[1] - cols))
    kept = torch.gather(padded, 1, kept_column_index(columns, positions, spec)).sum()
    return float(kept), float(importance.float().abs().sum())


def select_vnm(importance: dict[str, torch.Tensor], m: int, tolerance: float = 0.01, samples_per_type: int = 4,
               pad_rows: bool = False) -> tuple[dict[str, VNMSpec], dict]:
    """Choose V per layer type from the importance kept; returns ({type: spec}, report for the manifest).

    Without `pad_rows` only the Vs that divide the row count of every module of a type are candidates.
    """
    by_type: dict[str, list[str]] = {}
    for name in importance:
        by_type.setdefault(layer_type(name), []).append(name)
    choice: dict[str, VNMSpec] = {}
    report: dict[str, dict] = {}
    for kind, names in by_type.items():
        step = max(1, len(names) // samples_per_type)
        sample = names[::step][:samples_per_type]
        candidates = [v for v in V_CHOICES if pad_rows or all(importance[n].shape[0] % v == 0 for n in names)]
        if not candidates:
            rows = sorted({importance[n].shape[0] for n in names})
            raise UsageError(f"--vnm auto: {kind} has {rows} rows, which no V in {V_CHOICES} divides; "
                             "pass --pad-rows to pad with zero rows")
        kept = {}
        for v in candidates:
            spec = VNMSpec(v, 2, m)
            totals = [kept_fraction(importance[n], spec) for n in sample]
            kept[v] = sum(k for k, _ in totals) / max(1e-30, sum(t for _, t in totals))
        best = max(kept.values())
        v = max(v for v in candidates if kept[v] >= best * (1 - tolerance))
        choice[kind] = VNMSpec(v, 2, m)
        report[kind] = {"vnm": str(choice[kind]), "kept_fraction": {str(k): round(f, 5) for k, f in kept.items()},
                        "sampled_modules": sample}
        log.info("V:N:M auto: %s -> %s (importance kept %s; largest V within %.1f%% of the best)", kind,
                    choice[kind], ", ".join(f"V={k} {f:.4f}" for k, f in kept.items()), 100 * tolerance)
    return choice, {"m": m, "density": 2 / m, "tolerance": tolerance, "layer_types": report}
