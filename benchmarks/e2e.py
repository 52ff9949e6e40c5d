"""End to end on a GPU: a Llama-2-7B-shaped model in bf16 through HF transformers versus compressed by lowc.

    python benchmarks/e2e.py                                   # everything (about 15-25 min on one H100)
    python benchmarks/e2e.py --parts checkpoint,hf             # or in pieces of < 10 min each; the results
    python benchmarks/e2e.py --parts w4a16,vnm-w6a8            # file is merged part by part, and the checkpoint
    python benchmarks/e2e.py --parts serve                     # and artifacts stay in --workdir between calls
    python benchmarks/e2e.py --smoke                           # a tiny model on CPU: checks the script works

Model: random weights (std 0.02) in the Llama-2-7B shape (hidden 4096, intermediate 11008, 32 heads, 32 layers,
vocab 32000; `--layers` shrinks it), written on the GPU machine as a bf16 safetensors checkpoint with a word-level
tokenizer. max_position_embeddings is 8192 (Llama-2 has 4096) so the 8k-token prefill case exists; RoPE and all
costs are unchanged by that.

- Baseline `hf`: transformers, bf16, `attn_implementation="sdpa"`; decode with a static cache and the forward
  compiled by torch.compile (mode reduce-overhead) when that works here, else the eager static / dynamic cache
  (the row says which ran). Decode tokens/s = (N-1) / (time to generate N tokens - time to generate 1), batch 1,
  128-token prompt; prefill = one forward of 8192 tokens keeping only the last logits.
- Ours: `lowc.compress` to dense W4A16 (RTN, group 128) and to 64:2:5 + W6A8 (RTN, no channel permutation:
  pointless on random weights), each loaded by `lowc.load(device="cuda")` and run through the engine of
  `lowc serve` (CUDA graphs for decode, SageAttention for prefill).
- Weights in GPU memory: bytes of all parameters and buffers of the loaded module vs the bf16 model.
- `serve`: `lowc serve` in a subprocess on the reference model (../shared/models/ref-llama-wt2 when present, else
  the random checkpoint), 64 concurrent streaming requests (all must end with [DONE] and their full token count),
  aggregate tokens/s against the same requests sent one at a time; then SIGINT and a clean exit.

Parts run in one call merge into the results file's `details` with those of earlier calls (delete the file, or
pass another --out, to start over). Writes benchmarks/results/e2e_<device>.json (schema of shared/DESIGN.md)
with one `targets` entry per target of the issue: decode batch 1 >= 2.5x HF bf16, prefill 8k >= 1.5x, weights in
GPU memory <= 0.3x bf16 (per lowc variant), and 64 concurrent streams complete with none lost.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowc  # noqa: E402
from lowc.checkpoint import write_checkpoint  # noqa: E402
from lowc.runtime.bench import bench_decode, bench_prefill, module_bytes  # noqa: E402

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
    "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
SMOKE = {**LLAMA2_7B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "max_position_embeddings": 256}
VARIANTS = {
    "w4a16": ("dense W4A16 g128 + sage", dict(wbits=4, group=128)),
    "vnm-w6a8": ("64:2:5 + W6A8 + sage", dict(vnm="64:2:5", wbits=6, abits=8, permute=False)),
}
ALL_PARTS = ("checkpoint", "hf", "w4a16", "vnm-w6a8", "serve")
REF_MODEL = ROOT.parent / "shared" / "models" / "ref-llama-wt2"


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ checkpoint
def word_tokenizer(path: Path, vocab: int) -> None:
    """A `tokenizers` WordLevel tokenizer with words w3..w{vocab-1} (0 pad, 1 bos, 2 eos): text that streams."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))


def make_checkpoint(path: Path, config: dict, device: str, seed: int = 0) -> int:
    """Random bf16 weights (std 0.02, norms 1) written as an HF checkpoint; reused when the config matches."""
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()) == config:
        log(f"checkpoint {path} exists; reused")
        return -1
    g = torch.Generator(device=device).manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]

    def w(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(v, h), "lm_head.weight": w(v, h), "model.norm.weight": ones(h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
            p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h), p + "mlp.down_proj.weight": w(h, i),
        })
    write_checkpoint(path, config, tensors)
    word_tokenizer(path, v)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return sum(t.numel() for t in tensors.values())


# ------------------------------------------------------------------------------------------------ HF baseline
def _hf_load(ckpt: Path, device: str):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="sdpa")
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.to(device).eval()


def _hf_prefill(model, n: int, vocab: int, device: str, repeats: int = 3) -> float:
    ids = torch.randint(3, vocab, (1, n), device=device)
    times = []
    with torch.inference_mode():
        for r in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            try:
                model(ids, use_cache=False, logits_to_keep=1)
            except TypeError:
                model(ids, use_cache=False, num_logits_to_keep=1)
            sync()
            if r:
                times.append(time.perf_counter() - t0)
    return n / sorted(times)[len(times) // 2]


def _hf_decode(model, prompt: int, new: int, vocab: int, device: str, cache: str | None) -> float:
    ids = torch.randint(3, vocab, (1, prompt), device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if cache:
        kw["cache_implementation"] = cache

    def timed(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        assert out.shape[1] == prompt + n, f"generated {out.shape[1] - prompt} tokens, wanted {n}"
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up (compiles when the forward is compiled)
        timed(new)
        timed(1)
    t_n = min(timed(new) for _ in range(3))
    t_1 = min(timed(1) for _ in range(3))
    return (new - 1) / max(t_n - t_1, 1e-9)


def run_hf(ckpt: Path, a, device: str) -> dict:
    model = _hf_load(ckpt, device)
    vocab = model.config.vocab_size
    out = {"weight_bytes": module_bytes(model)}
    out["prefill_tokens_s"] = _hf_prefill(model, a.prefill, vocab, device)
    log(f"HF prefill {a.prefill}: {out['prefill_tokens_s']:,.0f} tokens/s")
    attempts = [("static cache + torch.compile", "static", True), ("static cache, eager", "static", False),
                ("dynamic cache, eager", None, False)]
    if device == "cpu" or a.no_compile:
        attempts = attempts[1:]
    for name, cache, compiled in attempts:
        try:
            if compiled:
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            out["decode_tokens_s"] = _hf_decode(model, a.prompt, a.new_tokens, vocab, device, cache)
            out["decode_config"] = name
            log(f"HF decode batch 1 ({name}): {out['decode_tokens_s']:,.1f} tokens/s")
            break
        except Exception as e:  # noqa: BLE001 - try the next configuration, and say why
            log(f"HF decode with {name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if compiled:
                model = _hf_load(ckpt, device)
                torch._dynamo.reset()
    if device.startswith("cuda"):
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    del model
    torch._dynamo.reset()  # compiled graphs hold the model's weights
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ lowc variants
def run_lowc(ckpt: Path, workdir: Path, key: str, a, device: str) -> dict:
    label, recipe = VARIANTS[key]
    artifact = workdir / f"artifact-{key}-{a.layers}layers"  # reused between calls only for the same model
    if not (artifact / "lowc.json").is_file():
        t0 = time.perf_counter()
        lowc.compress(ckpt, artifact, lowc.Recipe(**recipe), device=device, progress=False, force=True)
        log(f"compressed {key} in {time.perf_counter() - t0:.0f} s")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = lowc.load(artifact, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    attention = a.attention if device.startswith("cuda") else "sdpa"
    cache = torch.int8 if a.kv_cache == "int8" else None
    out = {"label": label, "weight_bytes": module_bytes(model), "attention": attention, "kv_cache": a.kv_cache}
    out["prefill_tokens_s"] = bench_prefill(model, [a.prefill], attention=attention, cache_dtype=cache)[0]["value"]
    log(f"{key} prefill {a.prefill}: {out['prefill_tokens_s']:,.0f} tokens/s")
    decode = bench_decode(model, [1], a.prompt, a.new_tokens, attention=attention, cache_dtype=cache)[0]
    out["decode_tokens_s"], out["cuda_graphs"] = decode["value"], decode["graphs"]
    log(f"{key} decode batch 1: {out['decode_tokens_s']:,.1f} tokens/s (CUDA graphs: {decode['graphs']})")
    if a.unfused:  # the same decode without the fused kernels and projections (what they are worth)
        plain = bench_decode(model, [1], a.prompt, a.new_tokens, attention=attention, fuse=False,
                             cache_dtype=cache)[0]
        out["decode_tokens_s_unfused"] = plain["value"]
        log(f"{key} decode batch 1 unfused: {plain['value']:,.1f} tokens/s")
    if device.startswith("cuda"):
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    del model
    return out


# ------------------------------------------------------------------------------------------------ serve test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stream(client, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    done, tokens, finish, chunks = False, 0, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "tokens": 0}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                chunks += 1
                finish = choice.get("finish_reason") or finish
    return {"ok": done and finish == "length" and tokens == max_tokens, "tokens": tokens, "chunks": chunks}


async def _burst(url: str, prompts: list[str], max_tokens: int, concurrent: bool) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(_stream(client, p, max_tokens) for p in prompts))
        else:
            results = [await _stream(client, p, max_tokens) for p in prompts]
        return list(results), time.perf_counter() - t0


def run_serve(model_path: Path, a, device: str) -> dict:
    import httpx

    port = _free_port()
    seq = a.serve_prompt_words + a.serve_tokens + 32
    cmd = [sys.executable, "-c", "from lowc.runtime.serve_command import serve; serve()", str(model_path),
           "--port", str(port), "--device", device, "--max-batch", str(a.concurrent), "--max-seq-len", str(seq),
           "--max-concurrent", str(2 * a.concurrent), "--max-tokens", str(a.serve_tokens), "--shutdown-grace", "5"]
    log(f"starting: lowc serve {model_path} --port {port} ...")
    logfile = open(Path(a.workdir) / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lowc serve exited with {proc.returncode}; see {a.workdir}/serve.log")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("lowc serve did not become healthy in 300 s")
            time.sleep(0.5)
        from lowc.runtime.tokenizer import load_tokenizer

        config = json.loads((Path(model_path) / "config.json").read_text())
        tok = load_tokenizer(model_path, config) if (Path(model_path) / "tokenizer.json").is_file() else None
        words = "the history of the city was written in a book by the people who lived there".split()
        if tok is None or not tok.encode("the"):
            words = [f"w{i}" for i in range(3, 60)]
        prompts = [" ".join((words * 20)[i % 7: i % 7 + a.serve_prompt_words]) for i in range(a.concurrent)]
        asyncio.run(_burst(url, prompts, a.serve_tokens, True))  # warm-up: CUDA graphs for every batch bucket
        seq_results, seq_s = asyncio.run(_burst(url, prompts[:a.sequential], a.serve_tokens, False))
        con_results, con_s = asyncio.run(_burst(url, prompts, a.serve_tokens, True))
        out = {
            "model": str(model_path), "concurrent": a.concurrent,
            "completed": sum(r["ok"] for r in con_results), "lost": sum(not r["ok"] for r in con_results),
            "aggregate_tokens_s": sum(r["tokens"] for r in con_results) / con_s,
            "sequential_tokens_s": sum(r["tokens"] for r in seq_results) / seq_s,
            "sequential_ok": all(r["ok"] for r in seq_results), "wall_s": con_s,
        }
        log(f"serve: {out['completed']}/{a.concurrent} streams complete, {out['aggregate_tokens_s']:,.0f} tokens/s "
            f"aggregate vs {out['sequential_tokens_s']:,.0f} one at a time")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out_code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out_code = None
        logfile.close()
    out["exit_code_after_sigint"] = out_code  # 0: drained and stopped cleanly
    return out


# ------------------------------------------------------------------------------------------------ report
def device_tag(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return next((t for t in ("h200", "h100", "a100", "l40s", "l4") if t in name), name.split()[-1])


def build_report(state: dict, a, device: str) -> dict:
    rows, targets = [], []
    hf = state.get("hf")
    base_name = f"HF transformers bf16 sdpa ({hf.get('decode_config', '?')})" if hf else None
    for key in VARIANTS:
        ours = state.get(key)
        if not ours:
            continue
        label = ours["label"]
        cases = (("decode_tokens_s", f"decode batch 1, {a.prompt}-token prompt, {label}", 2.5,
                  "decode batch 1 >= 2.5x HF bf16"),
                 ("prefill_tokens_s", f"prefill {a.prefill} tokens, {label}", 1.5,
                  f"prefill {a.prefill} >= 1.5x HF bf16"))
        for metric_key, case, goal, target in cases:
            b = hf.get(metric_key) if hf else None
            ratio = ours[metric_key] / b if b else None
            rows.append({"case": case, "metric": "tokens/s", "ours": round(ours[metric_key], 2),
                         "baseline_name": base_name, "baseline": round(b, 2) if b else None,
                         "ratio": round(ratio, 3) if ratio else None})
            targets.append({"name": f"{target} ({label})", "goal": goal,
                            "measured": round(ratio, 3) if ratio else None, "met": bool(ratio and ratio >= goal)})
        b = hf["weight_bytes"] if hf else None
        frac = ours["weight_bytes"] / b if b else None
        rows.append({"case": f"weights in GPU memory, {label}", "metric": "GiB",
                     "ours": round(ours["weight_bytes"] / 2**30, 3), "baseline_name": "HF transformers bf16",
                     "baseline": round(b / 2**30, 3) if b else None, "ratio": round(1 / frac, 3) if frac else None})
        targets.append({"name": f"weights in GPU memory <= 0.3x bf16 ({label})", "goal": 0.3,
                        "measured": round(frac, 4) if frac else None, "met": bool(frac and frac <= 0.3)})
    serve = state.get("serve")
    if serve:
        rows.append({"case": f"lowc serve, {serve['concurrent']} concurrent streams ({Path(serve['model']).name}), "
                             f"{a.serve_tokens} tokens each", "metric": "tokens/s",
                     "ours": round(serve["aggregate_tokens_s"], 1), "baseline_name": "same requests one at a time",
                     "baseline": round(serve["sequential_tokens_s"], 1),
                     "ratio": round(serve["aggregate_tokens_s"] / serve["sequential_tokens_s"], 2)})
        targets.append({"name": f"{serve['concurrent']} concurrent streaming requests complete, none lost",
                        "goal": serve["concurrent"], "measured": serve["completed"],
                        "met": serve["lost"] == 0 and serve["completed"] == serve["concurrent"]})
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "lowc": lowc.__version__,
                "python": platform.python_version()}
    for mod in ("triton", "transformers", "fastapi", "uvicorn"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "versions": versions,
            "command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "model": state.get("model"), "details": state, "results": rows,
            "targets": targets}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma-separated subset of {', '.join(ALL_PARTS)}")
    p.add_argument("--serve-test", action="store_true", help="only the serve part (same as --parts serve)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped model")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens of the decode runs")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated by the decode runs")
    p.add_argument("--prefill", type=int, default=8192, help="prompt tokens of the prefill runs")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile for the HF baseline")
    p.add_argument("--attention", choices=("sage", "sdpa"), default="sage",
                   help="lowc's attention on CUDA: SageAttention for prefill and decode steps, or torch SDPA")
    p.add_argument("--kv-cache", choices=("model", "int8"), default="model", help="lowc's KV cache (as lowc serve)")
    p.add_argument("--unfused", action="store_true",
                   help="also time lowc decode without the fused decode kernels and projections")
    p.add_argument("--serve-model", type=Path, help="model for the serve part (default: ref-llama-wt2 if present)")
    p.add_argument("--concurrent", type=int, default=64)
    p.add_argument("--sequential", type=int, default=4, help="requests sent one at a time for the comparison")
    p.add_argument("--serve-tokens", type=int, default=128)
    p.add_argument("--serve-prompt-words", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lowc-e2e")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/e2e_<device>.json)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, small shapes: checks the script works")
    a = p.parse_args()

    if a.smoke:
        device, config = "cpu", dict(SMOKE)
        a.prompt, a.new_tokens, a.prefill = min(a.prompt, 16), min(a.new_tokens, 16), min(a.prefill, 128)
        a.concurrent, a.sequential, a.serve_tokens, a.serve_prompt_words = 8, 2, 16, 8
        a.workdir = a.workdir.with_name(a.workdir.name + "-smoke")
        a.out = a.out or a.workdir / "e2e_smoke_cpu.json"
    else:
        if not torch.cuda.is_available():
            sys.exit("this benchmark needs a CUDA GPU (use --smoke to check it on CPU)")
        device, config = "cuda", {**LLAMA2_7B, "num_hidden_layers": a.layers}
    parts = ["serve"] if a.serve_test else [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        sys.exit(f"--parts: unknown {', '.join(sorted(unknown))} (known: {', '.join(ALL_PARTS)})")
    a.workdir.mkdir(parents=True, exist_ok=True)
    out = a.out or ROOT / "benchmarks" / "results" / f"e2e_{device_tag(device)}.json"
    state = json.loads(out.read_text())["details"] if out.is_file() else {}  # merge part by part
    ckpt = a.workdir / "ckpt"
    state["model"] = {"shape": "Llama-2-7B" if not a.smoke else "tiny (smoke)", "layers": config["num_hidden_layers"],
                      "weights": "random bf16", "max_position_embeddings": config["max_position_embeddings"]}

    if any(x in parts for x in ("checkpoint", "hf", *VARIANTS)) or (("serve" in parts) and a.serve_model is None
                                                                    and not REF_MODEL.is_dir()):
        t0 = time.perf_counter()
        n = make_checkpoint(ckpt, config, device)
        if n > 0:
            log(f"checkpoint: {n / 1e9:.3f} B parameters in {time.perf_counter() - t0:.0f} s")
    if "hf" in parts:
        state["hf"] = run_hf(ckpt, a, device)
    for key in VARIANTS:
        if key in parts:
            state[key] = run_lowc(ckpt, a.workdir, key, a, device)
    if "serve" in parts:
        model = a.serve_model or (REF_MODEL if REF_MODEL.is_dir() and not a.smoke else ckpt)
        state["serve"] = run_serve(model, a, device)
    report = build_report(state, a, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    for t in report["targets"]:
        log(f"target {'MET' if t['met'] else 'not met'}: {t['name']}: measured {t['measured']} (goal {t['goal']})")


if __name__ == "__main__":
    main()
