"""Where the time of a lowc decode step goes: tokens/s with and without the fused decode path, then a
torch.profiler table of the GPU kernels of eager decode steps (CUDA graphs off, so every kernel is visible).

    PYTHONPATH=$PWD python benchmarks/profile_decode.py [--layers 8] [--wbits 4] [--workdir /tmp/lowc-prof]

Model: the random Llama-2-7B-shaped checkpoint of benchmarks/e2e.py with `--layers` decoder layers, compressed
to dense W{wbits} g128 (RTN) and loaded on the GPU in bf16. Batch 1, 128-token prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

import lowc  # noqa: E402
from lowc.runtime.bench import bench_decode  # noqa: E402
from lowc.runtime.engine import Engine, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lowc-prof"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this profile needs a CUDA GPU")
    ckpt = a.workdir / f"ckpt-{a.layers}"
    e2e.make_checkpoint(ckpt, dict(e2e.LLAMA2_7B, num_hidden_layers=a.layers), "cuda")
    art = a.workdir / f"w{a.wbits}-{a.layers}"
    if not (art / "lowc.json").is_file():
        lowc.compress(ckpt, art, lowc.Recipe(wbits=a.wbits), device="cuda", progress=False, force=True)
    model = lowc.load(art, device="cuda", dtype=torch.bfloat16)
    for fuse in (True, False):
        r = bench_decode(model, [1], 128, 64, attention="sage", fuse=fuse)[0]
        print(f"fuse={fuse}: {r['value']:.1f} tokens/s, {r['ms_per_step']:.3f} ms/step (CUDA graphs {r['graphs']})")
    eng = Engine(model, max_batch=1, max_seq_len=256, cuda_graphs=False, attention="sage")
    params = SamplingParams(max_tokens=a.steps, temperature=0.0, ignore_eos=True)
    eng.submit(list(range(3, 131)), params)
    eng.run_until_idle()  # warm-up: autotuning and compilation happen here
    eng.submit(list(range(3, 131)), params)
    eng.step()  # the prefill stays out of the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.run_until_idle()
        torch.cuda.synchronize()
    steps = a.steps - 1
    print(f"GPU kernels over {steps} eager decode steps ({a.layers} layers; per step = total / {steps}):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))


if __name__ == "__main__":
    main()
