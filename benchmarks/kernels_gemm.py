"""Low-bit GEMM benchmark on a CUDA GPU: lowc's Triton W{4,6,8}A16 and W{4,6,8}A8 kernels against cuBLAS.

Shapes are the Llama-2-7B/70B linears (N x K) at 1, 16, 128 and 4096 tokens. Every case is first checked against
the reference (fp32 matmul on `reference.dequantize_int`; the A8 kernels also against `wa8_reference`), then timed
with `triton.testing.do_bench` (median, L2 flushed before every run). Shapes of <= 128 tokens are timed as
CUDA-graph replays cycling through copies of the weight larger than L2: launch overhead is left out and every
weight comes from DRAM. Peers, measured in the same run: cuBLAS bf16 (`torch.nn.functional.linear`), cuBLAS int8
(`torch._int_mm` on per-channel INT8 weights, with the same activation quantization kernel and a torch epilogue
for the scales) and, when onnxruntime-gpu is installed, onnxruntime's 4-bit `MatMulNBits` on the same W4 g128
weights (decode only; CUDA EP under its CUDA graph, see ort_matmulnbits.py). A device-to-device copy gives the
bandwidth ceiling.

    PYTHONPATH=$PWD python benchmarks/kernels_gemm.py [--quick] [--out DIR]

Writes `kernels_gemm_<device>.json` (schema in DESIGN.md) and a PNG (if matplotlib is installed) to DIR
(default benchmarks/results) and prints a short table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import ort_matmulnbits
from lowc.kernels import packing, reference, wa16_gemm as wa16_mod
from lowc.kernels.lowbit_layout import LowbitWeight, to_lowbit_layout
from lowc.kernels.wa8_gemm import quantize_rows, wa8_gemm, wa8_reference
from lowc.kernels.wa16_gemm import wa16_gemm

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]  # (N out, K in)
TOKENS = [1, 16, 128, 4096]
GROUP = 128


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def bench_rotating_ms(op, weights: list) -> float:
    """Time per call of op(weight) inside one CUDA graph that cycles through `weights` (copies of one weight,
    together larger than L2, so every call streams its weight from DRAM as in a real decode step); graphs
    leave out the host's launch overhead, which would otherwise dominate microsecond kernels."""
    for w in weights[:2]:
        op(w)  # compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            op(w)
    return bench_ms(graph.replay) / len(weights)


def copy_count(tensor_bytes: int) -> int:
    """How many copies of a tensor hold at least 160 MB (over three times H100's 50 MB L2), 2 to 32."""
    return max(2, min(32, -(-160_000_000 // tensor_bytes)))


def copies(tensor_bytes: int, make) -> list:
    """copy_count(tensor_bytes) copies made by make()."""
    return [make() for _ in range(copy_count(tensor_bytes))]


def clone_weight(w: LowbitWeight) -> LowbitWeight:
    return LowbitWeight(w.bits, w.group, w.n, w.k, w.k_pad, w.codes.clone(),
                        None if w.high is None else w.high.clone(), w.scales.clone())


def copy_bandwidth() -> float:
    """Bytes read plus bytes written per second by a 1 GiB device-to-device copy."""
    a = torch.randn(1 << 28, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def random_weight(n: int, k: int, bits: int, group: int):
    """Canonical packed codes over the full range, fp16 scales, and the kernel-layout weight."""
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), device="cuda")
    qweight = packing.pack_int(codes, bits)
    scales = (torch.rand(n, -(-k // group), device="cuda") * 0.02 + 1e-3).half()
    return qweight, scales, to_lowbit_layout(qweight, scales, bits, group, k)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.float()
    if not torch.isfinite(y).all():
        return math.inf
    return float((y - ref).norm() / ref.norm())


def int_mm_linear(x: torch.Tensor, w8t: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    """The cuBLAS int8 peer: per-token quantization, torch._int_mm, per-token x per-channel scales in torch."""
    xq, xs = quantize_rows(x)
    return (torch._int_mm(xq, w8t).float() * xs[:, None] * wscale[None, :]).to(x.dtype)


def device_slug(name: str) -> str:
    m = re.search(r"[ABHL]\d{2,3}", name)
    return m.group(0).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sweep(n: int, k: int, tokens: list[int]) -> None:
    """Time every config of a small grid for one shape (tuning aid): W{4,6,8}A16 and W{4,6,8}A8, g128 and
    per-channel, against cuBLAS bf16; prints one line per config, fastest first."""
    import itertools

    from lowc.kernels.wa8_gemm import wa8_gemm_quantized
    from lowc.kernels.wa16_gemm import GemmConfig, fit_block_k

    for m in tokens:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        wb = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        t_bf16 = bench_ms(lambda: torch.nn.functional.linear(x, wb))
        print(f"--- {n}x{k} t{m}: cuBLAS bf16 {t_bf16 * 1e3:.1f} us", flush=True)
        if m == 1:  # the one-token kernel
            grid = [GemmConfig(1, bn, bk, sk, nw, 1, gemv=True) for bn, bk, nw, sk in itertools.product(
                (4, 8, 16, 32), (256, 512, 1024), (1, 2, 4, 8), (1, 2))]
        elif m <= 16:
            grid = [GemmConfig(16, bn, bk, 1, 4, ns) for bn, bk, ns in itertools.product(
                (16, 32, 64, 128), (128, 256), (1, 3))]
            grid += [GemmConfig(16, 64, 128, 2, 4, 3), GemmConfig(16, 64, 128, 4, 4, 3)]
        else:
            grid = [GemmConfig(128, 128, 128, 1, 8, 3), GemmConfig(128, 128, 64, 1, 8, 4),
                    GemmConfig(128, 256, 128, 1, 8, 3), GemmConfig(256, 128, 128, 1, 8, 3),
                    GemmConfig(128, 128, 128, 1, 4, 3), GemmConfig(64, 128, 128, 1, 4, 4)]
        xq, xs = quantize_rows(x)
        for bits, group, kind in [(4, 128, "a16"), (4, k, "a16"), (8, 128, "a16"),
                                  (4, 128, "a8"), (4, k, "a8"), (8, k, "a8")]:
            if (kind == "a8") != (m > 16):
                continue
            _, _, w = random_weight(n, k, bits, group)
            times = []
            for cfg in grid:
                cfg = fit_block_k(cfg, w, m)
                fn = ((lambda c=cfg: wa16_gemm(x, w, config=c)) if kind == "a16"
                      else (lambda c=cfg: wa8_gemm_quantized(xq, xs, w, config=c)))
                try:
                    fn()
                    # few tokens: graph replays, so host launch overhead does not hide the kernel's time;
                    # decode with L2 cleared before every call (weights come from DRAM in a model)
                    if m <= 16:
                        t = wa16_mod.bench_cold(fn)
                    elif m <= 128:
                        t = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
                    else:
                        t = bench_ms(fn)
                    times.append((t, cfg))
                except Exception as e:  # out of shared memory / registers for this tile
                    print(f"  skip {tuple(cfg)}: {type(e).__name__}")
            times = sorted(set(times))
            label = f"W{bits}{'A16' if kind == 'a16' else 'A8'} {'g128' if group == 128 else 'pc'}"
            for t, cfg in times[:4]:
                frac = w.nbytes / (t * 1e-3) / COPY_BW[0]
                print(f"{label:10s} {t * 1e3:8.1f} us  x{t_bf16 / t:5.2f}  {100 * frac:4.0f}% copy  {tuple(cfg)}",
                      flush=True)


COPY_BW = [3.0e12]
ORT_PEER = "onnxruntime MatMulNBits (CUDA EP, CUDA graph)"


def matmulnbits_ms(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, k: int, dense: torch.Tensor,
                   checks: list) -> float | None:
    """onnxruntime MatMulNBits on the same W4 g128 weight: checked against the fp32 product, then timed per
    product over enough weight copies to stream from DRAM (None, with a failed check, when it is wrong)."""
    codes = packing.unpack_int(qweight, 4, k)
    n_copies = copy_count(qweight.nbytes)
    peer = ort_matmulnbits.MatMulNBitsPeer(codes, scales, GROUP, x.shape[0], n_copies)
    ref = x.float() @ dense.t()
    err = rel_err(peer(x), ref)
    ok = err < 8e-3
    checks.append({"case": f"MatMulNBits {dense.shape[0]}x{k} t{x.shape[0]}", "rel_err_vs_fp32": round(err, 6),
                   "ok": ok})
    if not ok:
        print(f"CHECK FAILED MatMulNBits: rel err {err:.3g}", flush=True)
        return None
    peer.run()  # the CUDA graph is captured on the first runs
    return bench_ms(peer.run) / n_copies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, tokens 1/16/4096 (a smoke run)")
    ap.add_argument("--sweep", metavar="NxK", help="time a grid of configs for one shape instead")
    ap.add_argument("--tokens", default="1,16,4096", help="token counts for --sweep")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--attach-btc", metavar="RESULTS_JSON",
                    help="only refresh the BTC targets of this results file from kernels_btc_<device>.json beside it")
    args = ap.parse_args()
    if args.attach_btc:
        attach_btc(Path(args.attach_btc))
        return 0
    if not torch.cuda.is_available():
        print("kernels_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.sweep:
        COPY_BW[0] = copy_bandwidth()
        n, k = map(int, args.sweep.lower().split("x"))
        sweep(n, k, [int(t) for t in args.tokens.split(",")])
        return 0
    torch.manual_seed(0)
    shapes = [SHAPES[0], SHAPES[-1]] if args.quick else SHAPES
    tokens = [1, 16, 4096] if args.quick else TOKENS
    copy_bw = copy_bandwidth()
    with_ort = ort_matmulnbits.cuda_available()
    print("onnxruntime MatMulNBits peer:", "on" if with_ort else "off (onnxruntime-gpu is not installed)", flush=True)
    rows: list[dict] = []
    checks: list[dict] = []
    table: list[tuple] = []

    def row(case, metric, ours, base_name, base, ratio):
        rows.append({"case": case, "metric": metric, "ours": round(ours, 5), "baseline_name": base_name,
                     "baseline": round(base, 5), "ratio": round(ratio, 4)})

    for n, k in shapes:
        dense_bf16 = {}
        weights = {}
        for bits in (4, 6, 8):
            qweight, scales, w = random_weight(n, k, bits, GROUP)
            weights[f"W{bits}"] = (qweight, scales, w, GROUP)
        # per-channel INT8 weights: the layout cuBLAS int8 can serve, so W8A8 is compared like for like
        q8, s8, w8 = random_weight(n, k, 8, k)
        weights["W8pc"] = (q8, s8, w8, k)
        for bits in (4, 6):  # per-channel low-bit weights: shows what the group-wise scales cost in prefill
            weights[f"W{bits}pc"] = (*random_weight(n, k, bits, k), k)
        w8t = packing.unpack_int(q8, 8, k).t()  # [K, N] column-major view for cuBLAS
        w8scale = s8[:, 0].float()
        for name, (qweight, scales, w, group) in weights.items():
            dense_bf16[name] = reference.dequantize_int(qweight, scales, w.bits, group, k)
        w_bf16 = dense_bf16["W4"].to(torch.bfloat16)
        for m in tokens:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            shape = f"{n}x{k} t{m}"
            if m <= 128:
                t_bf16 = bench_rotating_ms(lambda wb: torch.nn.functional.linear(x, wb),
                                           copies(w_bf16.nbytes, w_bf16.clone))
            else:
                t_bf16 = bench_ms(lambda: torch.nn.functional.linear(x, w_bf16))
            t_int = t_ort = None
            if m > 16:
                t_int = bench_ms(lambda: int_mm_linear(x, w8t, w8scale))
            if with_ort and m <= 16:
                t_ort = matmulnbits_ms(x, *weights["W4"][:2], k, dense_bf16["W4"], checks)
            kernels = [("W4A16", "W4", "a16"), ("W6A16", "W6", "a16")]
            if m <= 16:
                kernels.append(("W8A16", "W8", "a16"))
            if m >= 16:
                kernels += [("W4A8", "W4", "a8"), ("W6A8", "W6", "a8"), ("W8A8pc", "W8pc", "a8")]
            if m >= 4096:
                kernels += [("W4A8pc", "W4pc", "a8"), ("W6A8pc", "W6pc", "a8")]
            for label, wname, kind in kernels:
                qweight, scales, w, group = weights[wname]
                ref = x.float() @ dense_bf16[wname].t()
                op = wa16_gemm if kind == "a16" else wa8_gemm
                y = op(x, w)  # autotunes on first call
                err = rel_err(y, ref)
                check = {"case": f"{label} {shape}", "rel_err_vs_fp32": round(err, 6)}
                ok = err < (8e-3 if kind == "a16" else 2e-2)
                if kind == "a8" and m <= 16:
                    emu = wa8_reference(x, qweight, scales, w.bits, group, k)
                    close = bool(torch.allclose(y.float(), emu.float(), rtol=2.0**-7, atol=1e-3))
                    check["matches_wa8_reference"] = close
                    ok = ok and close
                check["ok"] = ok
                checks.append(check)
                if not ok:
                    print(f"CHECK FAILED {check}", flush=True)
                    continue
                if m <= 128:
                    t = bench_rotating_ms(lambda wq: op(x, wq), copies(w.nbytes, lambda: clone_weight(w)))
                else:
                    t = bench_ms(lambda: op(x, w))
                row(f"{label} {shape}", "ms", t, "cuBLAS bf16 (torch linear)", t_bf16, t_bf16 / t)
                if t_ort is not None and label == "W4A16":
                    row(f"{label} {shape}", "ms", t, ORT_PEER, t_ort, t_ort / t)
                if t_int is not None and kind == "a8":
                    row(f"{label} {shape}", "ms", t, "torch._int_mm W8A8 per-channel incl. act quant", t_int,
                        t_int / t)
                bw = w.nbytes / (t * 1e-3)
                if m <= 16:
                    row(f"{label} {shape} packed-byte bandwidth", "TB/s", bw / 1e12, "device copy (read+write)",
                        copy_bw / 1e12, bw / copy_bw)
                table.append((label, shape, t * 1e3, t_bf16 / t, None if t_int is None or kind != "a8"
                              else t_int / t, bw / copy_bw if m <= 16 else None))
                print(f"{label:8s} {shape:18s} {t * 1e3:9.1f} us  x{t_bf16 / t:5.2f} vs bf16", flush=True)
        weights = dense_bf16 = w_bf16 = w8t = None  # free this shape's tensors before the next
        torch.cuda.empty_cache()

    def ratios(label, pred, baseline="cuBLAS bf16 (torch linear)", metric="ms"):
        return [r["ratio"] for r in rows if r["case"].split()[0] == label and pred(int(r["case"].split()[2][1:]))
                and r["baseline_name"] == baseline and r["metric"] == metric]

    decode = lambda t: t <= 16  # noqa: E731
    prefill = lambda t: t == 4096  # noqa: E731
    targets = []

    def target(name, goal, values, note):
        measured = min(values) if values else None
        targets.append({"name": name, "goal": goal, "measured": measured,
                        "met": measured is not None and measured >= goal, "note": note})

    every = "worst case over the 5 shapes" if not args.quick else "worst case over the quick shapes"
    target("decode W6A16 speedup vs cuBLAS bf16 (1-16 tokens)", 2.4, ratios("W6A16", decode),
           f"{every} at 1 and 16 tokens")
    target("decode W4A16 speedup vs cuBLAS bf16 (1-16 tokens)", 3.2, ratios("W4A16", decode),
           f"{every} at 1 and 16 tokens")
    target("decode W4A16 fraction of measured copy bandwidth on packed bytes", 0.85,
           ratios("W4A16", decode, "device copy (read+write)", "TB/s"), f"{every} at 1 and 16 tokens")
    target("decode W4A16 speedup vs onnxruntime MatMulNBits", 1.3, ratios("W4A16", decode, ORT_PEER),
           f"{every} at 1 and 16 tokens; MatMulNBits on fp16 activations, ours on bf16" if with_ort
           else "not measured: onnxruntime-gpu was not installed in this run")
    for label in ("W6A8", "W4A8"):
        target(f"prefill {label} speedup vs cuBLAS bf16 (4096 tokens)", 1.15, ratios(label, prefill),
               f"{every}; weights group 128, includes activation quantization (per-channel rows WxA8pc "
               "in results show the same kernels without group scales)")
        target(f"prefill {label} speedup vs torch._int_mm incl. activation quantization (4096 tokens)", 1.0,
               ratios(label, prefill, "torch._int_mm W8A8 per-channel incl. act quant"), every)
    name = torch.cuda.get_device_name()
    targets += btc_targets(Path(args.out) / f"kernels_btc_{device_slug(name)}.json")

    result = {
        "device": name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "command": "PYTHONPATH=$PWD python benchmarks/kernels_gemm.py" + (" --quick" if args.quick else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_TBps": round(copy_bw / 1e12, 4),
        "results": rows,
        "targets": targets,
        "checks": checks,
        "configs": {" ".join(map(str, key)): cfg._asdict() for key, cfg in wa16_mod._TUNED.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_gemm_{device_slug(name)}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    try:
        plot(table, out / f"kernels_gemm_{device_slug(name)}.png", name)
    except ImportError:
        print("matplotlib not installed: no plot")

    print(f"\n{name}  copy {copy_bw / 1e12:.2f} TB/s  -> {path}")
    print(f"{'kernel':8s} {'shape':18s} {'us':>8s} {'x bf16':>7s} {'x int_mm':>8s} {'%copy':>6s}")
    for label, shape, us, vb, vi, frac in table:
        print(f"{label:8s} {shape:18s} {us:8.1f} {vb:7.2f} {'' if vi is None else f'{vi:8.2f}':>8s} "
              f"{'' if frac is None else f'{100 * frac:5.0f}%':>6s}")
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['name']}: goal {t['goal']}, measured {t['measured']}")
    return 0 if all(c["ok"] for c in checks) else 1


def btc_targets(path: Path) -> list[dict]:
    """The BTC GEMM targets, from the results file of benchmarks/kernels_btc.py (which measures the BTC kernel
    against this unpack path on the same shapes): correctness of every bit pair, and its speed against the
    unpack-to-INT8 GEMM at 1 token and at 4096 tokens (worst case over shapes and bit pairs)."""
    if not path.is_file():
        note = f"not measured: run benchmarks/kernels_btc.py first (it writes {path.name} to the same folder)"
        return [{"name": n, "goal": 1.0, "measured": None, "met": False, "note": note} for n in (
            "BTC GEMM correct for W6A6, W6A8, W4A8, W2A8", "BTC GEMM speed vs unpack path, 1 token",
            "BTC GEMM speed vs unpack path, 4096 tokens")]
    doc = json.loads(path.read_text())
    ok = sum(c["ok"] for c in doc["checks"]) / len(doc["checks"])
    vs = [r for r in doc["results"] if r["baseline_name"].startswith("lowc unpack")]
    out = [{"name": "BTC GEMM correct for W6A6, W6A8, W4A8, W2A8", "goal": 1.0, "measured": round(ok, 4),
            "met": ok == 1.0, "note": f"{len(doc['checks'])} checks against wa8_reference in {path.name}"}]
    for tokens in (1, 4096):
        ratios = {r["case"]: r["ratio"] for r in vs if r["case"].endswith(f" t{tokens}")}
        wins = sorted(c.removeprefix("BTC ") for c, v in ratios.items() if v > 1)
        worst = min(ratios.values()) if ratios else None
        out.append({"name": f"BTC GEMM speed vs unpack path, {tokens} token{'s' if tokens > 1 else ''}", "goal": 1.0,
                    "measured": worst, "met": worst is not None and worst >= 1.0,
                    "note": f"worst case over shapes and bit pairs in {path.name}; faster than the unpack path in "
                            f"{len(wins)} of {len(ratios)} cases" + (f" ({', '.join(wins)})" if 0 < len(wins) <= 8
                                                                       else "")})
    return out


def attach_btc(results: Path) -> None:
    """Refresh the BTC targets of an existing kernels_gemm results file from kernels_btc's file beside it."""
    doc = json.loads(results.read_text())
    btc = results.with_name(results.name.replace("kernels_gemm_", "kernels_btc_"))
    doc["targets"] = [t for t in doc["targets"] if not t["name"].startswith("BTC GEMM")] + btc_targets(btc)
    results.write_text(json.dumps(doc, indent=1) + "\n")


def plot(table, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r[0] for r in table}, key=lambda s: (s[-3:], s))
    cases = list(dict.fromkeys(r[1] for r in table))
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        vals = {r[1]: r[3] for r in table if r[0] == label}
        ax.bar([j + i * width for j in range(len(cases))], [vals.get(c, 0) for c in cases], width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup vs cuBLAS bf16")
    ax.set_title(f"lowc low-bit GEMMs, {device}")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
