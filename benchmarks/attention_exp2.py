"""SageAttention prefill with P's exp2 on the MUFU (exp2_fma 0), every other column on the FMA units (1) or all on
them (2): D = 128, 16k tokens x 32 heads, S = 4k/8k, causal and not, FP8 and FP16 P.V; TOPS (quantization included)
and the best variant's ratios to SDPA FLASH and cuDNN in the same run, plus its difference from exp2_fma 0.

    PYTHONPATH=$PWD python benchmarks/attention_exp2.py
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from lowc.kernels import sage_attention as sa


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def tops(b, h, s, d, causal, ms):
    return 4 * b * h * s * s * d / (2 if causal else 1) / (ms * 1e-3) / 1e12


print(f"{'S':>5} {'causal':6} {'pv':4} {'flash':>6} {'cudnn':>6} {'fma0':>6} {'fma1':>6} {'fma2':>6} "
      f"{'x flash':>8} {'x cudnn':>8} {'best':>4} {'rel':>8}")
for s in (4096, 8192):
    b, h, d = 16384 // s, 32, 128
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k[..., :8] += 10
    for causal in (False, True):
        peers = {}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(backend):
                peers[name] = tops(b, h, s, d, causal, bench(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)))
        for pv in ("fp8", "fp16"):
            base = sa.default_config(d, causal, pv == "fp8")
            res, outs = {}, {}
            for e in (0, 1, 2):
                cfg = sa.AttnConfig(base.block_m, base.block_n, base.num_warps, base.num_stages, exp2_fma=e)
                outs[e] = sa.sage_attention(q, k, v, causal=causal, pv_dtype=pv, config=cfg)
                res[e] = tops(b, h, s, d, causal, bench(
                    lambda: sa.sage_attention(q, k, v, causal=causal, pv_dtype=pv, config=cfg)))
            rel = max(float((outs[e].float() - outs[0].float()).abs().sum() / outs[0].float().abs().sum())
                      for e in (1, 2))
            best = max(res, key=res.get)
            print(f"{s:5} {str(causal):6} {pv:4} {peers['flash']:6.0f} {peers['cudnn']:6.0f} {res[0]:6.0f} "
                  f"{res[1]:6.0f} {res[2]:6.0f} {res[best] / peers['flash']:8.3f} {res[best] / peers['cudnn']:8.3f} "
                  f"{best:4} {rel:8.1e}", flush=True)
