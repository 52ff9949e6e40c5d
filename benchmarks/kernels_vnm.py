"""V:N:M sparse GEMM benchmark on a CUDA GPU: lowc's mma.sp kernel against cuBLAS bf16 dense and cuSPARSELt 2:4.

Phase 1 (correctness, never stops early): every (pattern, shape, tokens) case that phase 2 times, plus a sweep of
V in {32, 64, 128} x M in {4, 5, 8, 16} x tokens {1, 7, 16, 128, 300} on odd shapes, fp16 and bias variants and
explicit split-K configs, each compared with the fp32 reference (`kernels.reference.vnm_to_dense`); prints one
line per case with the max error and, for a failure, where the wrong outputs sit (row % 16, token % 8), which
points at the fragment / metadata mapping.

Phase 2 (timing): Llama-2 7B/70B linear shapes (N out x K in) at 1, 16, 128 and 4096 tokens for 64:2:5, 64:2:8 and
2:4 (V=64, M=4). Shapes of <= 128 tokens are timed as CUDA-graph replays cycling through copies of the weight
larger than L2 (every weight streams from DRAM, no launch overhead); 4096 tokens with `triton.testing.do_bench`.
Peers in the same run: cuBLAS bf16 (`torch.nn.functional.linear`) and, for 2:4, cuSPARSELt through
`torch.sparse.to_sparse_semi_structured` (also under CUDA graphs; skipped with a note where torch refuses it).

    PYTHONPATH=$PWD python benchmarks/kernels_vnm.py [--quick] [--out DIR]

Writes `kernels_vnm_<device>.json` (schema in DESIGN.md, one `targets` entry per target of issue 8) to DIR
(default benchmarks/results) and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from lowc.kernels import vnm_layout
from lowc.kernels import vnm_spmm as vnm_mod
from lowc.kernels.reference import quantize_activations, vnm_to_dense
from lowc.kernels.vnm_dense import DENSE_PREFILL_TOKENS, vnm_dense_linear, vnm_int8_lowbit
from lowc.kernels.wa8_gemm import wa8_gemm
from lowc.kernels.vnm_layout import VNMInt8Weight, VNMKernelWeight, to_vnm_int8_layout, to_vnm_kernel_layout
from lowc.kernels.vnm_spmm import VNMConfig, vnm_spmm, vnm_spmm_int8

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]  # (N out, K in)
TOKENS = [1, 16, 128, 4096]
PATTERNS = [(64, 5), (64, 8), (64, 4)]  # (V, M); M = 4 is plain 2:4
PAIRS = torch.tensor(list(itertools.combinations(range(4), 2)))


def pattern_name(v: int, m: int) -> str:
    return "2:4" if m == 4 else f"{v}:2:{m}"


def device_slug(name: str) -> str:
    m = re.search(r"[ABHL]\d{2,3}", name)
    return m.group(0).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def random_vnm(rows: int, cols: int, v: int, m: int, dtype=torch.bfloat16, seed: int = 0):
    """Random canonical V:N:M storage on the GPU (uniform kept columns and positions, N(0, 0.02) values), its
    kernel layout and the dense matrix it encodes (x's dtype)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kb = -(-cols // m)
    rp = -(-rows // v) * v
    subsets = torch.tensor(list(itertools.combinations(range(m), 4)), device="cuda")
    columns = subsets[torch.randint(len(subsets), (rp // v, kb), generator=g, device="cuda")].to(torch.uint8)
    positions = PAIRS.cuda()[torch.randint(6, (rows, kb), generator=g, device="cuda")].to(torch.uint8)
    values = (torch.randn(rows, 2 * kb, generator=g, device="cuda") * 0.02).to(dtype)
    block_cols = columns.long().repeat_interleave(v, 0)[:rows]
    absolute = torch.gather(block_cols, 2, positions.long()) + (torch.arange(kb, device="cuda") * m).view(1, kb, 1)
    values = values.masked_fill(absolute.reshape(rows, 2 * kb) >= cols, 0)
    dense = vnm_to_dense(values, columns, positions, v, m, (rows, cols))
    w = to_vnm_kernel_layout(values, columns, positions, v, m, (rows, cols))
    return w, dense


def random_vnm_int8(rows: int, cols: int, v: int, m: int, seed: int = 0, meta_mode: str | None = None):
    """Random INT8 V:N:M weight (codes in [-127, 127], per-row scales), its kernel layout, the dense codes
    (float64) and the scales."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kb = -(-cols // m)
    rp = -(-rows // v) * v
    subsets = torch.tensor(list(itertools.combinations(range(m), 4)), device="cuda")
    columns = subsets[torch.randint(len(subsets), (rp // v, kb), generator=g, device="cuda")].to(torch.uint8)
    positions = PAIRS.cuda()[torch.randint(6, (rows, kb), generator=g, device="cuda")].to(torch.uint8)
    codes = torch.randint(-127, 128, (rows, 2 * kb), generator=g, device="cuda").to(torch.int8)
    block_cols = columns.long().repeat_interleave(v, 0)[:rows]
    absolute = torch.gather(block_cols, 2, positions.long()) + (torch.arange(kb, device="cuda") * m).view(1, kb, 1)
    codes = codes.masked_fill(absolute.reshape(rows, 2 * kb) >= cols, 0)
    scales = torch.rand(rows, generator=g, device="cuda") * 1e-4 + 1e-5
    w = to_vnm_int8_layout(codes, scales, columns, positions, v, m, (rows, cols),
                           meta_mode=meta_mode or INT8_MODE[0])
    dense = vnm_to_dense(codes.double(), columns, positions, v, m, (rows, cols))
    return w, dense, scales


INT8_MODE = [vnm_layout.DEFAULT_META_MODE]  # the metadata reading phase 1 found to match the hardware


def int8_reference(x: torch.Tensor, dense: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    q, s = quantize_activations(x, 8)
    return (q.double() @ dense.t()).float() * s[:, None] * scales


def clone_weight(w):
    if isinstance(w, VNMInt8Weight):
        return VNMInt8Weight(w.v, w.m, w.rows, w.cols, w.kb, w.kb_pad, w.columns.clone(), w.values.clone(),
                             w.meta.clone(), w.scales.clone(), w.meta_mode, w.group_pairs)
    return VNMKernelWeight(w.v, w.m, w.rows, w.cols, w.kb, w.kb_pad, w.columns.clone(), w.values.clone(),
                           w.meta.clone())


def copies(tensor_bytes: int, make) -> list:
    """Enough copies made by make() to hold at least 160 MB (over three times H100's 50 MB L2)."""
    return [make() for _ in range(max(2, min(32, -(-160_000_000 // tensor_bytes))))]


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def bench_graph_ms(op, weights: list) -> float:
    """Time per call of op(weight) inside one CUDA graph cycling through `weights`."""
    for w in weights[:2]:
        op(w)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on the capture stream (allocator pools, cuda.core stream cache)
        for w in weights[:2]:
            op(w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for w in weights:
            op(w)
    return bench_ms(graph.replay) / len(weights)


def copy_bandwidth() -> float:
    """Bytes read plus bytes written per second by a 1 GiB device-to-device copy."""
    a = torch.randn(1 << 28, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    del a, b
    return 2 * (1 << 28) * 4 / (ms * 1e-3)


def error_report(y: torch.Tensor, ref: torch.Tensor) -> dict:
    y = y.float()
    err = (y - ref).abs()
    tol = 1e-2 * ref.abs() + 1e-2 * (ref.abs().max() + 1e-6) * 2 ** -6
    bad = ~(err <= tol)  # NaN counts as bad
    out = {"max_abs_err": float(err.nan_to_num(math.inf).max()), "max_abs_ref": float(ref.abs().max()),
           "rel_err": float(((y - ref).norm() / ref.norm().clamp_min(1e-30)).nan_to_num(math.inf)),
           "bad": int(bad.sum()), "total": bad.numel(), "ok": not bool(bad.any())}
    if bad.any():
        tok = torch.arange(y.shape[0], device=y.device).view(-1, 1).expand_as(bad)
        row = torch.arange(y.shape[1], device=y.device).view(1, -1).expand_as(bad)
        out["bad_by_row_mod16"] = torch.bincount(row[bad] % 16, minlength=16).tolist()
        out["bad_by_token_mod8"] = torch.bincount(tok[bad] % 8, minlength=8).tolist()
        out["bad_rows_first"] = sorted(set(row[bad].tolist()))[:12]
        out["bad_tokens_first"] = sorted(set(tok[bad].tolist()))[:12]
        # is W's row r off everywhere (a metadata / A-fragment problem) or only some tokens (B / gather)?
        out["rows_all_bad_fraction"] = float((bad.all(0) & bad.any(0)).sum() / bad.any(0).sum().clamp_min(1))
    return out


def run_check(checks: list, label: str, fn, ref_fn) -> bool:
    t0 = time.perf_counter()
    try:
        y = fn()
        torch.cuda.synchronize()
        rep = error_report(y, ref_fn())
    except Exception as exc:  # noqa: BLE001 - report and keep going
        rep = {"ok": False, "exception": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(limit=6)[-1500:]}
    rep["case"] = label
    checks.append(rep)
    status = "ok  " if rep["ok"] else "FAIL"
    if "exception" in rep:
        print(f"{status} {label:44s} {rep['exception']}", flush=True)
        print(rep["traceback"], flush=True)
    else:
        print(f"{status} {label:44s} max err {rep['max_abs_err']:.3g} (max |ref| {rep['max_abs_ref']:.3g}, rel "
              f"{rep['rel_err']:.2e}) bad {rep['bad']}/{rep['total']}  {time.perf_counter() - t0:.1f}s", flush=True)
        if not rep["ok"]:
            print(f"     by row%16 {rep['bad_by_row_mod16']} by token%8 {rep['bad_by_token_mod8']} "
                  f"rows {rep['bad_rows_first']} tokens {rep['bad_tokens_first']} "
                  f"rows-all-bad {rep['rows_all_bad_fraction']:.2f}", flush=True)
    return rep["ok"]


def smoke(checks: list) -> None:
    """A few small cases covering every code path (decode, split-K, x^T prefill, fp16 + bias): quick enough to
    run under compute-sanitizer."""
    print("== smoke: small cases for compute-sanitizer ==", flush=True)
    for v, m, rows, cols, t, cfg in [(16, 4, 16, 16, 8, None), (64, 5, 133, 203, 1, None), (64, 5, 133, 203, 16, None),
                                     (32, 8, 70, 300, 300, None), (64, 8, 192, 1000, 37, VNMConfig(4, 1, 2, 4, 3)),
                                     (64, 8, 192, 1000, 37, VNMConfig(2, 1, 4, 4, 3, True))]:
        w, dense = random_vnm(rows, cols, v, m, seed=rows + t)
        x = torch.randn(t, cols, device="cuda").to(torch.bfloat16)
        run_check(checks, f"smoke {v}:2:{m} {rows}x{cols} t{t} {cfg}", lambda: vnm_spmm(x, w, config=cfg),
                  lambda: x.float() @ dense.float().t())
    w, dense = random_vnm(200, 333, 64, 5, dtype=torch.float16, seed=5)
    bias = torch.randn(200, device="cuda").to(torch.float16)
    x = torch.randn(16, 333, device="cuda").to(torch.float16)
    run_check(checks, "smoke fp16+bias 64:2:5 200x333 t16", lambda: vnm_spmm(x, w, bias),
              lambda: x.float() @ dense.float().t() + bias.float())
    for t, cfg in ((16, None), (37, VNMConfig(4, 1, 2, 1, 3))):
        w8, dense8, sc8 = random_vnm_int8(133, 403, 64, 5, seed=t)
        x = torch.randn(t, 403, device="cuda").to(torch.bfloat16)
        run_check(checks, f"smoke int8 64:2:5 133x403 t{t} {cfg}", lambda: vnm_spmm_int8(x, w8, config=cfg),
                  lambda: int8_reference(x, dense8, sc8))


def _u32_to_i32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def diagnose_layout(checks: list) -> None:
    """Run when the tiny cases fail: re-run one 16 x 16 tile with the metadata words and A fragments transformed
    by plausible misreadings of the PTX layout and report which (if any) gives the right product, so one GPU run
    says how to fix vnm_layout."""
    print("== layout diagnosis: which transformed metadata / fragment layout matches the hardware? ==", flush=True)
    w, dense = random_vnm(16, 64, 16, 4, seed=99)
    x = torch.randn(8, 64, device="cuda").to(torch.bfloat16)
    ref = x.float() @ dense.float().t()
    words = w.meta.long() & 0xFFFFFFFF

    def swap_halves(m):
        return ((m & 0xFFFF) << 16) | (m >> 16)

    def swap_fields(m):  # the two 2-bit indices of every nibble
        return ((m & 0x33333333) << 2) | ((m >> 2) & 0x33333333)

    def reverse_nibbles(m):  # nibble order inside each 16-bit half
        out = torch.zeros_like(m)
        for h in range(2):
            for c in range(4):
                out |= ((m >> (16 * h + 4 * c)) & 0xF) << (16 * h + 4 * (3 - c))
        return out

    metas = {"as built": words, "halves swapped": swap_halves(words), "index fields swapped": swap_fields(words),
             "nibbles reversed": reverse_nibbles(words), "halves+fields swapped": swap_fields(swap_halves(words))}
    vals = {"as built": w.values,
            "rows g/g+8 swapped": w.values.reshape(*w.values.shape[:3], 2, 2, 2).flip(4).reshape(w.values.shape)}
    for (mname, m), (vname, v) in itertools.product(metas.items(), vals.items()):
        wt = VNMKernelWeight(w.v, w.m, w.rows, w.cols, w.kb, w.kb_pad, w.columns, v.contiguous(),
                             _u32_to_i32(m).contiguous())
        try:
            y = vnm_spmm(x, wt)
            torch.cuda.synchronize()
            rep = error_report(y, ref)
            verdict = "MATCH" if rep["ok"] else f"bad {rep['bad']}/{rep['total']}"
        except Exception as exc:  # noqa: BLE001
            verdict = f"{type(exc).__name__}: {exc}"
        print(f"  metadata {mname:24s} values {vname:20s} -> {verdict}", flush=True)
        checks.append({"case": f"diagnosis metadata={mname} values={vname}", "ok": True, "verdict": verdict})


def correctness(shapes, tokens, checks: list) -> None:
    print("== phase 1: correctness vs reference (fp32) ==", flush=True)
    # the smallest case first: one V=16 x M=4 block row, 8 tokens: isolates the fragment / metadata mapping
    tiny_ok = True
    for v, m, rows, cols, t in [(16, 4, 16, 16, 8), (16, 4, 16, 64, 8), (16, 5, 16, 80, 8), (32, 4, 32, 128, 16)]:
        w, dense = random_vnm(rows, cols, v, m, seed=rows + cols)
        x = torch.randn(t, cols, device="cuda").to(torch.bfloat16)
        tiny_ok &= run_check(checks, f"tiny {v}:2:{m} {rows}x{cols} t{t}", lambda: vnm_spmm(x, w),
                             lambda: x.float() @ dense.float().t())
    if not tiny_ok:
        try:
            diagnose_layout(checks)
        except Exception as exc:  # noqa: BLE001
            print(f"layout diagnosis failed: {type(exc).__name__}: {exc}", flush=True)
    for v, m, t in itertools.product((32, 64, 128), (4, 5, 8, 16), (1, 7, 16, 128, 300)):
        rows, cols = 2 * v + 16 * (m % 3) + 5, 37 * m + 3
        w, dense = random_vnm(rows, cols, v, m, seed=v * 1000 + m * 10 + t)
        x = torch.randn(t, cols, device="cuda").to(torch.bfloat16)
        run_check(checks, f"sweep {v}:2:{m} {rows}x{cols} t{t}", lambda: vnm_spmm(x, w),
                  lambda: x.float() @ dense.float().t())
    w, dense = random_vnm(200, 333, 64, 5, dtype=torch.float16, seed=5)
    bias = torch.randn(200, device="cuda").to(torch.float16)
    for t in (1, 16, 200):
        x = torch.randn(t, 333, device="cuda").to(torch.float16)
        run_check(checks, f"fp16+bias 64:2:5 200x333 t{t}", lambda: vnm_spmm(x, w, bias),
                  lambda: x.float() @ dense.float().t() + bias.float())
    w, dense = random_vnm(192, 1000, 64, 8, seed=7)
    x = torch.randn(37, 1000, device="cuda").to(torch.bfloat16)
    for cfg in [VNMConfig(4, 1, 1, 4, 1), VNMConfig(4, 1, 2, 4, 3), VNMConfig(2, 2, 4, 2, 5), VNMConfig(4, 2, 8, 2, 1),
                VNMConfig(1, 1, 8, 1, 2), VNMConfig(4, 2, 8, 2, 1, True), VNMConfig(2, 1, 4, 4, 3, True),
                VNMConfig(1, 2, 2, 1, 2, True)]:
        run_check(checks, f"config {tuple(cfg)} 64:2:8 192x1000 t37", lambda: vnm_spmm(x, w, config=cfg),
                  lambda: x.float() @ dense.float().t())
    # INT8: which reading of the m16n8k32 .s8 metadata layout does the hardware use? (both are built and checked)
    mode_ok = {}
    for mode in vnm_layout.META_MODES:
        ok = True
        for v, m, rows, cols, t in [(16, 4, 16, 64, 8), (64, 5, 133, 403, 1), (64, 5, 133, 403, 16),
                                    (32, 8, 70, 300, 100), (128, 16, 300, 1000, 7)]:
            w, dense, sc = random_vnm_int8(rows, cols, v, m, seed=rows + t, meta_mode=mode)
            x = torch.randn(t, cols, device="cuda").to(torch.bfloat16)
            ok &= run_check(checks, f"int8 meta={mode} {v}:2:{m} {rows}x{cols} t{t}", lambda: vnm_spmm_int8(x, w),
                            lambda: int8_reference(x, dense, sc))
        mode_ok[mode] = ok
    good = [mode for mode, ok in mode_ok.items() if ok]
    print(f"INT8 metadata readings that match the hardware: {good or 'none'} "
          f"(default {vnm_layout.DEFAULT_META_MODE!r})", flush=True)
    if good:
        INT8_MODE[0] = good[0]
    for (n, k), (v, m) in itertools.product(shapes, PATTERNS):
        w, dense = random_vnm(n, k, v, m, seed=n + k + m)
        for t in tokens:
            x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
            run_check(checks, f"{pattern_name(v, m)} {n}x{k} t{t}", lambda: vnm_spmm(x, w),
                      lambda: x.float() @ dense.float().t())
        del w, dense
        torch.cuda.empty_cache()


def config_sweep(shapes, sweep_rows: list) -> None:
    """Time a small grid of tile configs for 64:2:5 (tuning aid for the next session); prints the best first."""
    print("== config sweep (64:2:5) ==", flush=True)
    decode = [VNMConfig(wr, 1, nt, kcp, split) for wr in (4, 2) for nt in (1, 2) for kcp in (2, 4)
              for split in (0, 1, 4)]
    prefill = [VNMConfig(4, 2, 8, 2, 0, True), VNMConfig(4, 2, 8, 1, 0, True), VNMConfig(4, 1, 8, 2, 0, True),
               VNMConfig(2, 2, 8, 2, 0, True), VNMConfig(4, 2, 4, 2, 0, True), VNMConfig(4, 2, 8, 2, 0, False)]
    for n, k in shapes:
        w, _ = random_vnm(n, k, 64, 5, seed=11)
        ws = copies(w.nbytes, lambda: clone_weight(w))
        for t in (1, 16, 4096):
            x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
            cands = [c for c in decode if t > 8 or c.nt == 1] if t <= 16 else prefill
            times = []
            for cfg in cands:
                try:
                    if t <= 16:
                        ms = bench_graph_ms(lambda wq: vnm_spmm(x, wq, config=cfg), ws)
                    else:
                        ms = bench_ms(lambda: vnm_spmm(x, w, config=cfg))
                    times.append((ms, tuple(cfg)))
                except Exception as exc:  # noqa: BLE001
                    print(f"  {n}x{k} t{t} {tuple(cfg)}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            times.sort()
            for ms, cfg in times[:5]:
                print(f"  {n}x{k} t{t:<5d} {ms * 1e3:8.1f} us  {cfg}", flush=True)
            sweep_rows += [{"shape": f"{n}x{k}", "tokens": t, "config": list(cfg), "ms": round(ms, 5)}
                           for ms, cfg in times]
        del w, ws
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes (a smoke run: correctness + a few timings)")
    ap.add_argument("--skip-check", action="store_true", help="skip phase 1")
    ap.add_argument("--smoke", action="store_true", help="only a few small correctness cases (for compute-sanitizer)")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile configs (on with --quick)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_vnm: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = [SHAPES[0], SHAPES[1]] if args.quick else SHAPES
    tokens = TOKENS
    name = torch.cuda.get_device_name()
    print(f"{name}; torch {torch.__version__}; backend ", end="", flush=True)
    try:
        print(vnm_mod.backend().name, flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"unavailable: {exc}", flush=True)
    checks: list[dict] = []
    if args.smoke:
        smoke(checks)
        n_bad = sum(not c["ok"] for c in checks)
        print(f"== smoke: {len(checks) - n_bad}/{len(checks)} ok ==", flush=True)
        return 0 if not n_bad else 1
    if not args.skip_check:
        t0 = time.perf_counter()
        correctness(shapes, tokens, checks)
        n_bad = sum(not c["ok"] for c in checks)
        print(f"== phase 1: {len(checks) - n_bad}/{len(checks)} ok, {time.perf_counter() - t0:.0f} s ==", flush=True)
        # written now so that a run cut short in phase 2 still leaves the correctness record
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"kernels_vnm_{device_slug(name)}_checks.json").write_text(
            json.dumps({"device": name, "int8_metadata_reading": INT8_MODE[0], "checks": checks}, indent=1) + "\n")

    print("== phase 2: timing ==", flush=True)
    rows: list[dict] = []
    table: list[tuple] = []
    notes: list[str] = []

    def row(case, metric, ours, base_name, base, ratio):
        rows.append({"case": case, "metric": metric, "ours": round(ours, 5), "baseline_name": base_name,
                     "baseline": round(base, 5), "ratio": round(ratio, 4)})

    failed_cases = {c["case"] for c in checks if not c["ok"]}
    copy_bw = copy_bandwidth()
    print(f"device copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    for n, k in shapes:
        wd = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        dense_ms = {}
        for t in tokens:
            x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
            if t <= 128:
                dense_ms[t] = bench_graph_ms(lambda w: torch.nn.functional.linear(x, w), copies(wd.nbytes, wd.clone))
            else:
                dense_ms[t] = bench_ms(lambda: torch.nn.functional.linear(x, wd))
        del wd
        for v, m in PATTERNS:
            pname = pattern_name(v, m)
            w, dense = random_vnm(n, k, v, m, seed=n * 3 + k + m)
            semis = None
            if m == 4:
                try:
                    from torch.sparse import to_sparse_semi_structured

                    semis = copies(n * k, lambda: to_sparse_semi_structured(dense))
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"cuSPARSELt {n}x{k}: to_sparse_semi_structured failed: {exc}")
            del dense
            for t in tokens:
                case = f"{pname} {n}x{k} t{t}"
                x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
                if case in failed_cases:
                    print(f"skip timing {case}: failed the correctness check", flush=True)
                    continue
                try:
                    if t <= 128:
                        ours = bench_graph_ms(lambda wq: vnm_spmm(x, wq), copies(w.nbytes, lambda: clone_weight(w)))
                    else:
                        ours = bench_ms(lambda: vnm_spmm(x, w))
                except Exception as exc:  # noqa: BLE001
                    print(f"timing {case} failed: {type(exc).__name__}: {exc}", flush=True)
                    notes.append(f"timing {case} failed: {type(exc).__name__}: {exc}")
                    continue
                base = dense_ms[t]
                flops = 2.0 * t * n * k
                row(case, "ms", ours, "cuBLAS bf16 (torch linear)", base, base / ours)
                sparse_ms = None
                if semis is not None:
                    try:
                        if t <= 128:
                            sparse_ms = bench_graph_ms(lambda s: torch.nn.functional.linear(x, s), semis)
                        else:
                            sparse_ms = bench_ms(lambda: torch.nn.functional.linear(x, semis[0]))
                        row(case, "ms", ours, "cuSPARSELt 2:4 (torch semi-structured)", sparse_ms, sparse_ms / ours)
                        row(f"cuSPARSELt {n}x{k} t{t}", "ms", base, "cuSPARSELt 2:4 vs cuBLAS bf16 (ratio = "
                            "cuSPARSELt speedup)", sparse_ms, base / sparse_ms)
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"cuSPARSELt {case}: {type(exc).__name__}: {str(exc)[:200]}")
                if t >= 128:  # A/B: the same tiles without the x^T staging (token-major scalar gather)
                    alt_cfg = vnm_mod.pick_config(t, w)._replace(xt=False)
                    try:
                        alt = (bench_graph_ms(lambda wq: vnm_spmm(x, wq, config=alt_cfg), copies(
                            w.nbytes, lambda: clone_weight(w))) if t <= 128 else
                            bench_ms(lambda: vnm_spmm(x, w, config=alt_cfg)))
                        row(f"alt-token-major-gather:{pname} {n}x{k} t{t}", "ms", alt, "cuBLAS bf16 (torch linear)",
                            base, base / alt)
                        print(f"         (same tiles, token-major gather: {alt * 1e3:9.1f} us x{base / alt:5.2f})",
                              flush=True)
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"alt timing {case}: {type(exc).__name__}: {exc}")
                if t >= 128:  # the runtime's prefill path: expand to a dense weight, then cuBLAS (vnm_dense)
                    try:
                        expanded = bench_ms(lambda: vnm_dense_linear(x, w))
                        row(f"expanded+cuBLAS:{pname} {n}x{k} t{t}", "ms", expanded, "cuBLAS bf16 (torch linear)",
                            base, base / expanded)
                        print(f"         (expanded + cuBLAS, the runtime's path from {DENSE_PREFILL_TOKENS} tokens: "
                              f"{expanded * 1e3:9.1f} us x{base / expanded:5.2f})", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"expanded timing {case}: {type(exc).__name__}: {exc}")
                if t <= 16:
                    bw = w.nbytes / (ours * 1e-3)
                    row(f"{case} packed-byte bandwidth", "TB/s", bw / 1e12, "device copy (read+write)",
                        copy_bw / 1e12, bw / copy_bw)
                table.append((pname, f"{n}x{k} t{t}", ours * 1e3, base / ours,
                              None if sparse_ms is None else sparse_ms / ours, flops / (ours * 1e-3) / 1e12))
                print(f"{pname:8s} {n}x{k} t{t:<5d} {ours * 1e3:9.1f} us  x{base / ours:5.2f} vs cuBLAS"
                      + ("" if sparse_ms is None else f"  x{sparse_ms / ours:5.2f} vs cuSPARSELt"), flush=True)
            del w, semis
            torch.cuda.empty_cache()

    int8_ok = any(c["ok"] for c in checks if c["case"].startswith(f"int8 meta={INT8_MODE[0]}")) or not checks
    for n, k in shapes:
        if not int8_ok:
            notes.append("INT8 timing skipped: no metadata reading passed the correctness checks")
            break
        wd = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for v, m in PATTERNS[:2]:
            w8, dense8, sc8 = random_vnm_int8(n, k, v, m, seed=n + k)
            for t in tokens:
                x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
                case = f"int8-{pattern_name(v, m)} {n}x{k} t{t}"
                try:
                    rep = error_report(vnm_spmm_int8(x, w8), int8_reference(x, dense8, sc8))
                    checks.append({**rep, "case": case})
                    if not rep["ok"]:
                        print(f"FAIL {case}: max err {rep['max_abs_err']:.3g}", flush=True)
                        continue
                    if t <= 128:
                        ours = bench_graph_ms(lambda wq: vnm_spmm_int8(x, wq), copies(w8.nbytes,
                                                                                    lambda: clone_weight(w8)))
                        base = bench_graph_ms(lambda w: torch.nn.functional.linear(x, w), copies(wd.nbytes, wd.clone))
                    else:
                        ours = bench_ms(lambda: vnm_spmm_int8(x, w8))
                        base = bench_ms(lambda: torch.nn.functional.linear(x, wd))
                except Exception as exc:  # noqa: BLE001
                    print(f"int8 {case} failed: {type(exc).__name__}: {exc}", flush=True)
                    notes.append(f"int8 {case}: {type(exc).__name__}: {exc}")
                    continue
                row(case, "ms", ours, "cuBLAS bf16 (torch linear)", base, base / ours)
                table.append((f"int8-{pattern_name(v, m)}", f"{n}x{k} t{t}", ours * 1e3, base / ours, None,
                              2.0 * t * n * k / (ours * 1e-3) / 1e12))
                print(f"int8-{pattern_name(v, m):8s} {n}x{k} t{t:<5d} {ours * 1e3:9.1f} us  x{base / ours:5.2f} vs "
                      f"cuBLAS (incl. activation quantization; metadata reading {INT8_MODE[0]!r})", flush=True)
                if t >= 128:  # the runtime's prefill path: expand to dense INT8 codes, then the W8A8 GEMM
                    try:
                        ref8 = int8_reference(x, dense8, sc8)
                        got8 = wa8_gemm(x, vnm_int8_lowbit(w8))
                        rep = error_report(got8, ref8)
                        checks.append({**rep, "case": f"expanded+wa8:{case}"})
                        expanded = bench_ms(lambda: wa8_gemm(x, vnm_int8_lowbit(w8)))
                        row(f"expanded+wa8:{case}", "ms", expanded, "cuBLAS bf16 (torch linear)", base,
                            base / expanded)
                        print(f"         (expanded + W8A8 GEMM, the runtime's path from {DENSE_PREFILL_TOKENS} tokens: "
                              f"{expanded * 1e3:9.1f} us x{base / expanded:5.2f}, ok={rep['ok']})", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"expanded int8 {case}: {type(exc).__name__}: {exc}")
            del w8, dense8
        del wd
        torch.cuda.empty_cache()

    sweep_rows: list[dict] = []
    if args.sweep or args.quick:
        try:
            config_sweep(shapes[:1] if args.quick else shapes[:2], sweep_rows)
        except Exception as exc:  # noqa: BLE001
            print(f"config sweep failed: {type(exc).__name__}: {exc}", flush=True)

    def ratios(pname, pred, baseline="cuBLAS bf16 (torch linear)"):
        return [r["ratio"] for r in rows if r["metric"] == "ms" and r["case"].split()[0] == pname
                and pred(int(r["case"].split()[2][1:])) and r["baseline_name"] == baseline]

    decode = lambda t: t <= 16  # noqa: E731
    prefill = lambda t: t == 4096  # noqa: E731
    every = "worst case over the 5 shapes" if not args.quick else "worst case over the quick shapes (2 of 5)"
    targets = []

    def target(name_, goal, values, note, strict=False):
        measured = min(values) if values else None
        met = measured is not None and (measured > goal if strict else measured >= goal)
        targets.append({"name": name_, "goal": goal, "measured": measured, "met": met, "note": note})

    target("64:2:5 bf16 speedup vs cuBLAS bf16 at 4096 tokens", 1.4, ratios("64:2:5", prefill), every)
    target("64:2:5 bf16 speedup vs cuBLAS bf16 at 1-16 tokens", 1.8, ratios("64:2:5", decode),
           f"{every} at 1 and 16 tokens")
    target("64:2:8 bf16 speedup vs cuBLAS bf16 at 4096 tokens", 2.0, ratios("64:2:8", prefill), every)
    target("64:2:8 bf16 speedup vs cuBLAS bf16 at 1-16 tokens", 2.5, ratios("64:2:8", decode),
           f"{every} at 1 and 16 tokens")
    target("2:4 (M=4) speedup vs cuSPARSELt 2:4 at every size", 1.0,
           ratios("2:4", lambda t: True, "cuSPARSELt 2:4 (torch semi-structured)"),
           f"{every}, tokens 1/16/128/4096" + ("" if ratios("2:4", lambda t: True,
                                                           "cuSPARSELt 2:4 (torch semi-structured)")
                                              else "; cuSPARSELt not measured in this run"))
    target("2:4 (M=4) speedup vs cuBLAS bf16 at 16 tokens (> 1.0)", 1.0, ratios("2:4", lambda t: t == 16),
           every, strict=True)
    target("64:2:5 INT8 values speedup vs cuBLAS bf16 at 1-16 tokens", 2.5, ratios("int8-64:2:5", decode),
           f"{every} at 1 and 16 tokens; per-token activation quantization included; per-row weight scales; "
           f"metadata reading {INT8_MODE[0]!r}")

    result = {
        "device": name,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": __import__("triton").__version__},
        "command": "PYTHONPATH=$PWD python benchmarks/kernels_vnm.py" + (" --quick" if args.quick else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": vnm_mod.backend().name if torch.cuda.is_available() else None,
        "results": rows,
        "targets": targets,
        "checks": checks,
        "copy_bandwidth_TBps": round(copy_bw / 1e12, 4),
        "config_sweep": sweep_rows,
        "int8_metadata_reading": INT8_MODE[0],
        "notes": notes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_vnm_{device_slug(name)}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{name} -> {path}")
    print(f"{'pattern':8s} {'case':20s} {'us':>9s} {'x cuBLAS':>9s} {'x cuSPLt':>9s} {'TFLOPS':>8s}")
    for pname, case, us, vb, vs, tf in table:
        print(f"{pname:8s} {case:20s} {us:9.1f} {vb:9.2f} {'' if vs is None else f'{vs:9.2f}':>9s} {tf:8.1f}")
    for note in notes:
        print("note:", note)
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['name']}: goal {t['goal']}, measured {t['measured']}")
    n_bad = sum(not c["ok"] for c in checks)
    if n_bad:
        print(f"{n_bad} correctness checks FAILED (see above and the JSON 'checks')")
    return 0 if not n_bad else 1


if __name__ == "__main__":
    sys.exit(main())
