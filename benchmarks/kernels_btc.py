"""BTC GEMM benchmark on a CUDA GPU: lowc's binary-tensor-core GEMM (any W/A bits) against the unpack-to-INT8
Triton GEMM (`wa8_gemm`, the W{4,6,8}A8/A6 path) and cuBLAS bf16, on the Llama-2-7B/70B linears.

Every case is first checked against `wa8_reference` (the exact A8/A6 emulation), then timed like
benchmarks/kernels_gemm.py: <= 128 tokens as CUDA-graph replays cycling through weight copies larger than L2,
4096 tokens with `do_bench`. Activation quantization is included in both lowc kernels' times (BTC also cuts the
activations into bit planes). W2 and W3 weights have no unpack path; their rows compare with W4A8.

    PYTHONPATH=$PWD python benchmarks/kernels_btc.py [--quick] [--out DIR]

Writes `kernels_btc_<device>.json` (schema in DESIGN.md) to DIR (default benchmarks/results), table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_gemm import bench_ms, bench_rotating_ms, clone_weight, copies, device_slug  # noqa: E402

from lowc.kernels import packing  # noqa: E402
from lowc.kernels.btc_gemm import btc_gemm  # noqa: E402
from lowc.kernels.btc_layout import BTCWeight, to_btc_layout  # noqa: E402
from lowc.kernels.lowbit_layout import to_lowbit_layout  # noqa: E402
from lowc.kernels.wa8_gemm import wa8_gemm, wa8_reference  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
TOKENS = [1, 16, 128, 4096]
PAIRS = [(6, 6), (6, 8), (4, 8), (2, 8)]  # the bit pairs; (3, 6) is checked for correctness only
GROUP = 128


def clone_btc(w: BTCWeight) -> BTCWeight:
    return BTCWeight(w.bits, w.group, w.n, w.k, w.k_pad, w.planes.clone(), w.scales.clone())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, tokens 1 and 4096")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_btc: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = [SHAPES[0], SHAPES[-1]] if args.quick else SHAPES
    tokens = [1, 4096] if args.quick else TOKENS
    rows, checks, table = [], [], []
    for n, k in shapes:
        wb = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        packed = {}
        for bits in (2, 3, 4, 6, 8):
            codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), device="cuda")
            qweight = packing.pack_int(codes, bits)
            scales = (torch.rand(n, k // GROUP, device="cuda") * 0.02 + 1e-3).half()
            packed[bits] = (qweight, scales, to_btc_layout(qweight, scales, bits, GROUP, k),
                            to_lowbit_layout(qweight, scales, bits, GROUP, k) if bits in (4, 6, 8) else None)
        for m in tokens:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            t_bf16 = (bench_rotating_ms(lambda w: torch.nn.functional.linear(x, w), copies(n * k * 2, wb.clone))
                      if m <= 128 else bench_ms(lambda: torch.nn.functional.linear(x, wb)))
            for wbits, abits in PAIRS + ([(3, 6)] if m == 1 else []):
                qweight, scales, bw, lw = packed[wbits]
                xs = x[:16]
                y = btc_gemm(xs, bw, act_bits=abits)
                ref = wa8_reference(xs, qweight, scales, wbits, GROUP, k, abits)
                diff = (y.float() - ref.float()).abs().max().item()
                ok = bool(torch.allclose(y.float(), ref.float(), rtol=2.0**-6, atol=1e-3))
                checks.append({"case": f"BTC W{wbits}A{abits} {n}x{k}", "max_abs_diff_vs_wa8_reference": diff,
                               "ok": ok})
                if (wbits, abits) not in PAIRS:
                    continue
                unpack_bits = max(wbits, 4)
                lw_unpack = packed[unpack_bits][3]
                if m <= 128:
                    t_btc = bench_rotating_ms(lambda w: btc_gemm(x, w, act_bits=abits),
                                              copies(bw.nbytes, lambda: clone_btc(bw)))
                    t_unp = bench_rotating_ms(lambda w: wa8_gemm(x, w, act_bits=abits),
                                              copies(lw_unpack.nbytes, lambda: clone_weight(lw_unpack)))
                else:
                    t_btc = bench_ms(lambda: btc_gemm(x, bw, act_bits=abits))
                    t_unp = bench_ms(lambda: wa8_gemm(x, lw_unpack, act_bits=abits))
                case = f"W{wbits}A{abits} g{GROUP} {n}x{k} t{m}"
                unpack_name = f"lowc unpack-to-INT8 W{unpack_bits}A{abits} (wa8_gemm)"
                rows.append({"case": f"BTC {case}", "metric": "us", "ours": round(t_btc * 1e3, 3),
                             "baseline_name": unpack_name, "baseline": round(t_unp * 1e3, 3),
                             "ratio": round(t_unp / t_btc, 4)})
                rows.append({"case": f"BTC {case}", "metric": "us", "ours": round(t_btc * 1e3, 3),
                             "baseline_name": "cuBLAS bf16", "baseline": round(t_bf16 * 1e3, 3),
                             "ratio": round(t_bf16 / t_btc, 4)})
                table.append((case, t_btc * 1e3, t_unp * 1e3, t_bf16 * 1e3, ok))
            del x
        del packed, wb
        torch.cuda.empty_cache()

    name = torch.cuda.get_device_name()
    wins = [r["case"] for r in rows if r["baseline_name"].startswith("lowc") and r["ratio"] > 1]
    targets = [{"name": "BTC GEMM correct for every listed bit pair (W6A6, W6A8, W4A8, W2A8; W3A6 too)",
                "goal": "all checks ok", "measured": f"{sum(c['ok'] for c in checks)}/{len(checks)} ok",
                "met": all(c["ok"] for c in checks)},
               {"name": "where BTC beats the unpack-to-INT8 GEMM (informational)", "goal": "report",
                "measured": ", ".join(wins) if wins else "nowhere in this run", "met": None}]
    result = {
        "device": name,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__},
        "command": "PYTHONPATH=$PWD python benchmarks/kernels_btc.py" + (" --quick" if args.quick else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": rows, "targets": targets, "checks": checks,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_btc_{device_slug(name)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{name} -> {path}")
    print(f"{'case':34s} {'BTC us':>9s} {'unpack us':>10s} {'bf16 us':>9s} {'vs unpack':>9s} {'vs bf16':>8s}  ok")
    for case, tb, tu, tf, ok in table:
        print(f"{case:34s} {tb:9.1f} {tu:10.1f} {tf:9.1f} {tu / tb:9.2f} {tf / tb:8.2f}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
