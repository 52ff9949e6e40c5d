"""Calibrated quantization of a Llama-2-7B-shaped model on one GPU: layer by layer, with peak memory reported.

    python benchmarks/calibrate_large.py --tokenizer ../shared/models/ref-llama-wt2 \
        --calib ../shared/data/wikitext-2/valid.txt --out benchmarks/results/calibrate_large_<device>.json

Random weights in the Llama-2-7B shape (hidden 4096, intermediate 11008, 32 heads, 32 layers, vocab 32000) are
written as a bf16 checkpoint, then `lowc.compress` runs GPTQ (act-order) + SmoothQuant W6A6 or W4 GPTQ with
`device="cuda"`: the model stays in host memory and one decoder layer at a time moves to the GPU. Reported: time
per phase, peak GPU memory (torch allocator), peak host memory (RSS), artifact size. The tokenizer only has to
produce ids below 32000 (the reference model's 30522-word tokenizer does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowc
from lowc.checkpoint import write_checkpoint

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
RECIPES = {
    "w4-gptq": dict(wbits=4, method="gptq", act_order=True),
    "w6a6-smooth-gptq": dict(wbits=6, abits=6, method="gptq", act_order=True, smooth=True),
}


def random_checkpoint(path: Path, config: dict, seed: int = 0) -> int:
    """Write a bf16 checkpoint of random weights (std 0.02, norms 1); returns the number of parameters."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def w(*shape):
        return (torch.randn(*shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16).cpu()

    tensors = {"model.embed_tokens.weight": w(v, h), "lm_head.weight": w(v, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h), p + "mlp.down_proj.weight": w(h, i),
        })
    write_checkpoint(path, config, tensors)
    return sum(t.numel() for t in tensors.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, required=True, help="directory with tokenizer.json (ids < 32000)")
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="w4-gptq")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lowc-large")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")

    config = {**LLAMA2_7B, "num_hidden_layers": args.layers}
    ckpt, artifact = args.workdir / "ckpt", args.workdir / "artifact"
    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.time()
    params = random_checkpoint(ckpt, config)
    shutil.copy(args.tokenizer / "tokenizer.json", ckpt / "tokenizer.json")
    t_ckpt = time.time() - t0
    print(f"checkpoint: {params / 1e9:.2f} B parameters written in {t_ckpt:.0f} s", flush=True)

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    lowc.compress(ckpt, artifact, calib=str(args.calib), calib_samples=args.samples, calib_seqlen=args.seqlen,
                  device="cuda", progress=False, **RECIPES[args.recipe])
    t_compress = time.time() - t0
    peak_gpu = torch.cuda.max_memory_allocated()
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    artifact_bytes = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*.safetensors"))
    metrics = json.loads((artifact / "lowc.json").read_text())["metrics"]
    print(f"compress ({args.recipe}, {args.samples}x{args.seqlen} calibration tokens): {t_compress:.0f} s; "
          f"peak GPU {peak_gpu / 2**30:.1f} GiB; peak host RSS {peak_host / 2**30:.1f} GiB; "
          f"artifact {artifact_bytes / 2**30:.2f} GiB vs bf16 {ckpt_bytes / 2**30:.2f} GiB", flush=True)

    goal = 80 * 2**30
    report = {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "lowc": lowc.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "command": " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "model": {"shape": "Llama-2-7B", "layers": args.layers, "parameters": params, "weights": "random bf16"},
        "recipe": RECIPES[args.recipe],
        "calibration": {"samples": args.samples, "seqlen": args.seqlen, "device": "cuda"},
        "results": [
            {"case": "checkpoint generation", "metric": "seconds", "ours": round(t_ckpt, 1)},
            {"case": f"lowc compress {args.recipe}", "metric": "seconds", "ours": round(t_compress, 1)},
            {"case": "peak GPU memory (allocator)", "metric": "GiB", "ours": round(peak_gpu / 2**30, 2)},
            {"case": "peak host memory (RSS)", "metric": "GiB", "ours": round(peak_host / 2**30, 2)},
            {"case": "artifact size", "metric": "GiB", "ours": round(artifact_bytes / 2**30, 3),
             "baseline_name": "bf16 checkpoint", "baseline": round(ckpt_bytes / 2**30, 3),
             "ratio": round(ckpt_bytes / artifact_bytes, 3)},
            {"case": "mean relative output error on calibration data", "metric": "rel_error",
             "ours": metrics.get("reconstruction", {}).get("output_rel_error_mean")},
        ],
        "targets": [{"name": "Llama-2-7B-shaped calibration layer by layer within 80 GB of GPU memory", "goal": 80,
                     "measured": round(peak_gpu / 2**30, 2), "unit": "GiB", "met": peak_gpu <= goal,
                     "layers": args.layers}],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
