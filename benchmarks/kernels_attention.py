"""SageAttention (lowc/kernels/sage_attention.py) against torch SDPA FLASH / CUDNN and pip sageattention 1.0.6.

One run on the GPU machine: tile-config sweep, accuracy vs fp32 on random inputs (K with outlier channels) and on
Q/K/V captured from the reference model, the reference model's perplexity with sage attention, prefill speed
(B x H = 32 heads x 16k tokens per batch, S = 1k..16k, D = 64/128, causal and not, quantization included), the
quantization kernels' share of the time, and decode (1 query, 32k cache, batch 16). Throughput counts
4*B*H*Sq*Sk*D operations (halved for causal). Writes benchmarks/results/kernels_attention_<device>.json (the
DESIGN.md schema) and a plot, and prints a short table.

    PYTHONPATH=$PWD python benchmarks/kernels_attention.py [--quick] [--out DIR] [--model DIR] [--data FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowc.kernels import sage_attention as sa  # noqa: E402
from lowc.kernels.reference import attention_reference  # noqa: E402

try:
    import sageattention
    from sageattention import sageattn
except ImportError:  # reported in the output and the JSON
    sageattention = sageattn = None

HEADS = 32
TOKENS_PER_BATCH = 16384


def bench(fn) -> float:
    """Median milliseconds (do_bench flushes L2 between runs)."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def tops(b: int, h: int, sq: int, sk: int, d: int, causal: bool, ms: float) -> float:
    return 4 * b * h * sq * sk * d / (2 if causal else 1) / (ms * 1e-3) / 1e12


def qkv(b, h, hkv, s, d, dtype=torch.bfloat16, sk=None, outliers=True):
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ()).item()))
    q = torch.randn(b, h, s, d, device="cuda", generator=g)
    k = torch.randn(b, hkv, sk or s, d, device="cuda", generator=g)
    v = torch.randn(b, hkv, sk or s, d, device="cuda", generator=g)
    if outliers:
        ch = torch.randperm(d, device="cuda", generator=g)[:max(1, d // 16)]
        k[..., ch] = k[..., ch] * 2 + 12
    return q.to(dtype), k.to(dtype), v.to(dtype)


def metrics(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan"), float("nan")
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    return cos, ((out - ref).abs().sum() / ref.abs().sum()).item()


def reference(q, k, v, causal):
    """fp32 reference, heads in chunks so the score matrix stays under ~2 GB."""
    group = q.shape[1] // k.shape[1]
    per_head = q.shape[0] * q.shape[2] * k.shape[2] * 4
    chunk = max(group, (2**31 // per_head) // group * group)
    outs = [attention_reference(q[:, i:i + chunk], k[:, i // group:(i + chunk) // group],
                                v[:, i // group:(i + chunk) // group], causal) for i in range(0, q.shape[1], chunk)]
    return torch.cat(outs, dim=1)


def sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


def pip_sage(q, k, v, causal):
    return sageattn(q, k, v, is_causal=causal)  # smooths k in place: idempotent after the first call


def ours(pv, config=None):
    def run(q, k, v, causal):
        return sa.sage_attention(q, k, v, causal=causal, pv_dtype=pv, config=config)
    return run


def attempt(what, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # keep the run going; the row is reported as missing
        print(f"  {what} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None


# ----------------------------------------------------------------------------------------------------------------

def sweep_configs(quick: bool, log: list) -> dict:
    """Best tile config per (D, causal) for FP8 P·V at S=4096, B=4, H=32."""
    candidates = {128: [sa.AttnConfig(128, 128, 8, 3), sa.AttnConfig(128, 64, 8, 3), sa.AttnConfig(128, 128, 8, 4),
                        sa.AttnConfig(128, 128, 4, 3)],
                  64: [sa.AttnConfig(128, 64, 4, 3), sa.AttnConfig(128, 128, 4, 3), sa.AttnConfig(128, 64, 8, 3)]}
    best = {}
    for d, causal in ((128, False), (128, True), (64, False)):
        q, k, v = qkv(4, HEADS, HEADS, 4096, d)
        timings = []
        for cfg in candidates[d][:2 if quick else None]:
            ms = attempt(f"config {cfg}", lambda c=cfg: bench(lambda: ours("fp8", c)(q, k, v, causal)))
            if ms is not None:
                timings.append((ms, cfg))
                log.append(f"D{d} causal={causal} {cfg}: {tops(4, HEADS, 4096, 4096, d, causal, ms):.0f} TOPS")
                print("  " + log[-1])
        best[(d, causal)] = min(timings, key=lambda t: t[0])[1] if timings else sa.default_config(d, causal, True)
    best[(64, True)] = best[(64, False)]
    # step note: the int32 -> fp32 bit trick against a plain conversion, on the best D=128 config
    cfg = best[(128, False)]
    q, k, v = qkv(4, HEADS, HEADS, 4096, 128)
    plain = sa.AttnConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, magic_cvt=False)
    for name, c in (("magic add", cfg), ("cvt instruction", plain)):
        ms = attempt(name, lambda c=c: bench(lambda: ours("fp8", c)(q, k, v, False)))
        if ms is not None:
            log.append(f"D128 non-causal int32->fp32 by {name}: {tops(4, HEADS, 4096, 4096, 128, False, ms):.0f} TOPS")
            print("  " + log[-1])
    return best


def accuracy_random(configs: dict, rows: list, acc: dict) -> None:
    for d in (64, 128):
        for causal in (False, True):
            q, k, v = qkv(1, 8, 8, 2048, d)
            ref = reference(q, k, v, causal)
            res = {"sage_fp8": ours("fp8", configs[(d, causal)])(q, k, v, causal),
                   "sage_fp16pv": ours("fp16", configs[(d, causal)])(q, k, v, causal),
                   "sdpa_flash_bf16": sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v, causal)}
            if sageattn is not None:
                res["pip_sageattention"] = sageattn(q, k.clone(), v, is_causal=causal)
            m = {name: metrics(out, ref) for name, out in res.items()}
            case = f"random D{d} S2048 {'causal' if causal else 'non-causal'}"
            acc[case] = m
            print(f"  {case}: " + ", ".join(f"{n} cos {c:.5f} L1 {r:.4f}" for n, (c, r) in m.items()))
            for name in ("sage_fp8", "sage_fp16pv"):
                base = "pip_sageattention" if "pip_sageattention" in m else "sdpa_flash_bf16"
                rows.append(row(f"accuracy {case} {name}", "cos", m[name][0], base, m[base][0], higher=True))


def capture_real_qkv(model, ids):
    from lowc.models.llama import apply_rope

    captured = {}

    def hook(module, args):
        x, cos, sin, _ = args
        b, t, _ = x.shape
        q = module.q_proj(x).view(b, t, module.n_heads, module.head_dim).transpose(1, 2)
        k = module.k_proj(x).view(b, t, module.n_kv_heads, module.head_dim).transpose(1, 2)
        v = module.v_proj(x).view(b, t, module.n_kv_heads, module.head_dim).transpose(1, 2)
        captured[module.layer_idx] = (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

    hooks = [layer.self_attn.register_forward_pre_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return captured


class SageFunctional:
    """Stands in for torch.nn.functional inside lowc.models.llama: SDPA calls go to sage_attention in fp16."""

    def __init__(self, pv: str | None):
        self.pv = pv

    def __getattr__(self, name):
        return getattr(F, name)

    def scaled_dot_product_attention(self, q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, scale=None):
        assert attn_mask is None, "the perplexity windows run without a cache"
        h = [t.to(torch.float16) for t in (q, k, v)]
        if self.pv is None:  # fp16 SDPA: what casting alone costs
            out = F.scaled_dot_product_attention(*h, is_causal=is_causal, enable_gqa=enable_gqa, scale=scale)
        else:
            out = sa.sage_attention(*h, causal=is_causal, pv_dtype=self.pv, sm_scale=scale)
        return out.to(q.dtype)


def real_model(model_dir: Path, data: Path, rows: list, acc: dict) -> dict:
    import lowc
    import lowc.models.llama as llama
    from lowc.runtime import evaluate

    model = lowc.load(model_dir, device="cuda")
    ids = evaluate.perplexity_ids(model.tokenizer, evaluate.read_lines(data), 65536)
    windows = torch.tensor(ids[:4 * 512], device="cuda").view(4, 512)
    captured = capture_real_qkv(model, windows)
    worst = {}
    for layer, (q, k, v) in captured.items():
        q, k, v = (t.to(torch.float16) for t in (q, k, v))
        ref = attention_reference(q, k, v, True)
        group = q.shape[1] // k.shape[1]
        kr, vr = (t.repeat_interleave(group, dim=1).bfloat16() for t in (k, v))
        res = {"sage_fp8": ours("fp8")(q, k, v, True), "sage_fp16pv": ours("fp16")(q, k, v, True),
               "sdpa_flash_bf16": sdpa(SDPBackend.FLASH_ATTENTION)(q.bfloat16(), kr, vr, True)}
        if sageattn is not None:
            res["pip_sageattention"] = sageattn(q, k.clone(), v, is_causal=True)
        for name, out in res.items():
            c, r = metrics(out, ref)
            w = worst.setdefault(name, [1.0, 0.0])
            w[0], w[1] = min(w[0], c), max(w[1], r)
    acc["real ref-llama 4x512 causal (worst layer)"] = {n: tuple(w) for n, w in worst.items()}
    print("  real Q/K/V, worst layer: " + ", ".join(f"{n} cos {c:.5f} L1 {r:.4f}" for n, (c, r) in worst.items()))
    base = "pip_sageattention" if "pip_sageattention" in worst else "sdpa_flash_bf16"
    for name in ("sage_fp8", "sage_fp16pv"):
        rows.append(row(f"accuracy real Q/K/V {name} (worst layer)", "cos", worst[name][0], base, worst[base][0],
                        higher=True))

    ppl = {}
    original = llama.F
    try:
        for name, functional in (("sdpa_fp32", original), ("sdpa_fp16", SageFunctional(None)),
                                 ("sage_fp8", SageFunctional("fp8")), ("sage_fp16pv", SageFunctional("fp16"))):
            llama.F = functional
            ppl[name] = evaluate.perplexity(model, ids, seqlen=512, progress=False)["perplexity"]
    finally:
        llama.F = original
    print("  perplexity (WikiText-2 test, first 65536 tokens, windows of 512): "
          + ", ".join(f"{n} {p:.3f}" for n, p in ppl.items()))
    for name in ("sage_fp8", "sage_fp16pv"):
        rows.append(row(f"perplexity ref-llama {name}", "ppl", ppl[name], "sdpa_fp32", ppl["sdpa_fp32"], higher=False))
    return ppl


def clean(obj):
    """NaN (a non-finite output) becomes null, so the file stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def row(case, metric, ours_value, baseline_name, baseline, higher=True):
    ratio = None
    if ours_value and baseline:
        ratio = ours_value / baseline if higher else baseline / ours_value
    return {"case": case, "metric": metric, "ours": ours_value, "baseline_name": baseline_name,
            "baseline": baseline, "ratio": ratio}


def speed(configs: dict, quick: bool, rows: list, table: list) -> dict:
    peers = {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    if sageattn is not None:
        peers["pip_sageattention"] = pip_sage
    lengths = (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384)
    results = {}
    for d in (128, 64):
        for causal in (False, True):
            for s in lengths:
                b = max(1, TOKENS_PER_BATCH // s)
                q, k, v = qkv(b, HEADS, HEADS, s, d)
                cfg = configs[(d, causal)]
                impls = {"sage_fp8": ours("fp8", cfg), "sage_fp16pv": ours("fp16", cfg), **peers}
                got = {}
                for name, fn in impls.items():
                    ms = attempt(f"{name} D{d} S{s}", lambda fn=fn: bench(lambda: fn(q, k, v, causal)))
                    got[name] = None if ms is None else tops(b, HEADS, s, s, d, causal, ms)
                key = (d, causal, s)
                results[key] = got
                case = f"prefill D{d} S{s} B{b} H{HEADS} {'causal' if causal else 'non-causal'}"
                for name in ("sage_fp8", "sage_fp16pv"):
                    for peer in peers:
                        rows.append(row(f"{case} {name}", "TFLOPS", got[name], peer, got[peer]))
                table.append((case, got))
                print(f"  {case}: " + ", ".join(f"{n} {t:.0f}" if t else f"{n} -" for n, t in got.items()))
    return results


def quant_share(configs: dict, quick: bool, rows: list) -> dict:
    share = {}
    for s in ((4096, 16384) if quick else (1024, 4096, 16384)):
        b = max(1, TOKENS_PER_BATCH // s)
        q, k, v = qkv(b, HEADS, HEADS, s, 128)
        cfg = configs[(128, False)]
        total = bench(lambda: sa.sage_attention(q, k, v, pv_dtype="fp8", config=cfg))
        quant = bench(lambda: sa._quantize_kv(k, v, block_n=cfg.block_n, pv_fp8=True))
        share[s] = quant / total
        print(f"  quantization D128 S{s}: {quant * 1e3:.0f} us of {total * 1e3:.0f} us ({100 * quant / total:.1f}%)")
        rows.append({"case": f"quantization share D128 S{s} B{b} H{HEADS} (K smoothing+INT8, V e4m3; Q is fused)",
                     "metric": "ms", "ours": quant, "baseline_name": "whole sage_attention call", "baseline": total,
                     "ratio": total / quant})
    return share


def decode(rows: list) -> dict:
    out = {}
    for hkv in (32, 8):
        b, sk, d = 16, 32768, 128
        q, k, v = qkv(b, HEADS, hkv, 1, d, sk=sk, outliers=False)
        ref = reference(q, k, v, False)
        cache = sa.quantize_kv_cache(k, v)
        gqa = hkv != HEADS

        def base():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        impls = {"sdpa_default": base, "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v, False),
                 "sage_decode_bf16_cache": lambda: sa.sage_decode(q, (k, v)),
                 "sage_decode_int8_cache": lambda: sa.sage_decode(q, cache)}
        got = {}
        for name, fn in impls.items():
            res = attempt(name, fn)
            ms = attempt(name, lambda fn=fn: bench(fn)) if res is not None else None
            got[name] = (ms, *(metrics(res, ref) if res is not None else (None, None)))
        case = f"decode 1 query, {sk} cache, B{b} H{HEADS} Hkv{hkv} D{d}"
        print(f"  {case}: " + ", ".join(f"{n} {m * 1e3:.0f} us cos {c:.5f}" if m else f"{n} -"
                                       for n, (m, c, _) in got.items()))
        baseline = min((got[n][0] for n in ("sdpa_default", "sdpa_flash") if got[n][0]), default=None)
        for name in ("sage_decode_bf16_cache", "sage_decode_int8_cache"):
            rows.append(row(f"{case} {name}", "ms", got[name][0], "sdpa (best of default, flash), bf16 cache",
                            baseline, higher=False))
        out[hkv] = (got, baseline)
    return out


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, (d, causal) in zip(axes, ((128, False), (128, True), (64, False), (64, True))):
        lengths = sorted(s for (dd, c, s) in results if dd == d and c == causal)
        names = results[(d, causal, lengths[0])].keys()
        for name in names:
            ax.plot(lengths, [results[(d, causal, s)][name] or float("nan") for s in lengths], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={d} {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TOPS (4*B*H*S^2*D, causal halved)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"attention throughput, {torch.cuda.get_device_name()}, B*S = {TOKENS_PER_BATCH}, H = {HEADS}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"  wrote {path}")


def targets(acc: dict, ppl: dict | None, results: dict, dec: dict) -> list:
    def min_ratio(d, causal, peer, lo=4096):
        vals = [r["sage_fp8"] / r[peer] for (dd, c, s), r in results.items()
                if dd == d and c == causal and s >= lo and r.get("sage_fp8") and r.get(peer)]
        return min(vals) if vals else None

    rand = [m["sage_fp8"] for case, m in acc.items() if case.startswith("random")]
    real = [m["sage_fp8"] for case, m in acc.items() if case.startswith("real")]
    out = []

    def add(name, goal, measured, higher=True):
        met = measured is not None and (measured >= goal if higher else measured <= goal)
        out.append({"name": name, "goal": goal, "measured": measured, "met": bool(met)})

    add("accuracy: cosine vs fp32 on random inputs (sage fp8, worst case)", 0.9995,
        min((c for c, _ in rand), default=None))
    add("accuracy: relative L1 vs fp32 on random inputs (sage fp8, worst case)", 0.02,
        max((r for _, r in rand), default=None), higher=False)
    add("accuracy: cosine vs fp32 on captured real Q/K/V (sage fp8, worst layer)", 0.9995,
        min((c for c, _ in real), default=None))
    add("accuracy: relative L1 vs fp32 on captured real Q/K/V (sage fp8, worst layer)", 0.02,
        max((r for _, r in real), default=None), higher=False)
    add("reference-model perplexity with sage attention (fp8) within 0.5% of SDPA (ratio - 1)", 0.005,
        None if not ppl else abs(ppl["sage_fp8"] / ppl["sdpa_fp32"] - 1), higher=False)
    add("speed S>=4096 D=128 non-causal vs SDPA FLASH (min ratio)", 1.9, min_ratio(128, False, "sdpa_flash"))
    add("speed S>=4096 D=128 non-causal vs cuDNN (min ratio)", 1.1, min_ratio(128, False, "sdpa_cudnn"))
    add("speed S>=4096 D=128 non-causal vs pip sageattention 1.0.6 (min ratio)", 1.7,
        min_ratio(128, False, "pip_sageattention"))
    add("speed S>=4096 D=128 causal vs SDPA FLASH (min ratio)", 1.6, min_ratio(128, True, "sdpa_flash"))
    got, baseline = dec.get(32, ({}, None))
    ms = got.get("sage_decode_int8_cache", (None,))[0]
    add("decode 1 query, 32k cache, batch 16 (MHA, INT8 cache) vs SDPA with a bf16 cache", 1.5,
        baseline / ms if ms and baseline else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer configs and lengths")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "ref-llama-wt2")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt")
    ap.add_argument("--skip-sweep", action="store_true", help="use the built-in default tile configs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    device = next((tag for tag in ("h200", "h100", "a100", "l40s", "l4") if tag in name.lower()), "gpu")
    print(f"{name}: torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
          f"sageattention {getattr(sageattention, '__version__', '1.0.6') if sageattention else 'not installed'}")
    rows, acc, table, log = [], {}, [], []

    print("tile configs (fp8, S=4096, B=4, H=32):")
    if args.skip_sweep:
        configs = {(d, c): sa.default_config(d, c, True) for d in (64, 128) for c in (False, True)}
    else:
        configs = sweep_configs(args.quick, log)
    print("  chosen: " + ", ".join(f"D{d}{' causal' if c else ''}: {cfg}" for (d, c), cfg in configs.items()))
    print("accuracy vs fp32:")
    accuracy_random(configs, rows, acc)
    ppl = None
    if (args.model / "config.json").is_file() and args.data.is_file():
        ppl = attempt("real model", real_model, args.model, args.data, rows, acc)
    else:
        print(f"  reference model or data missing ({args.model}, {args.data}): no real-input accuracy")
    print("quantization share:")
    share = quant_share(configs, args.quick, rows)
    print("decode:")
    dec = decode(rows)
    print("prefill speed (TOPS):")
    results = speed(configs, args.quick, rows, table)

    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / f"kernels_attention_{device}.png")
    doc = {
        "device": name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "sageattention": "1.0.6" if sageattention else None},
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "configs": {f"D{d}{'_causal' if c else ''}": vars(cfg) for (d, c), cfg in configs.items()},
        "config_sweep": log,
        "quantization_share": {str(s): v for s, v in share.items()},
        "accuracy": {case: {n: {"cos": c, "rel_l1": r} for n, (c, r) in m.items()} for case, m in acc.items()},
        "perplexity": ppl,
        "results": rows,
        "targets": targets(acc, ppl, results, dec),
    }
    path = args.out / f"kernels_attention_{device}.json"
    path.write_text(json.dumps(clean(doc), indent=1))
    print(f"wrote {path}")
    print("\ntargets:")
    for t in doc["targets"]:
        m = t["measured"]
        print(f"  [{'met' if t['met'] else 'MISS'}] {t['name']}: goal {t['goal']}, measured "
              f"{m if m is None else round(m, 4)}")
    print("\nD=128 TOPS (sage fp8 / fp16-PV / FLASH / cuDNN / pip sage):")
    for case, got in table:
        if " D128 " in case:
            print(f"  {case:45s} " + " ".join(f"{got.get(n) or 0:6.0f}" for n in
                                                ("sage_fp8", "sage_fp16pv", "sdpa_flash", "sdpa_cudnn",
                                                 "pip_sageattention")))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
