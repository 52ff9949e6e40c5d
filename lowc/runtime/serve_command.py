"""The `lowc serve` and `lowc bench` commands (registered on the `lowc` group with `cli.add_command`).

FastAPI and uvicorn are optional (`pip install 'lowc[serve]'`): they are imported when `serve` runs, with a
one-line error when missing.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import click
import torch

from ..errors import UsageError
from .kv_cache import bytes_per_token

log = logging.getLogger("lowc.runtime.serve")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_CHOICES = ("model", "int8")
KV_CACHE_HELP = ("KV cache: in the model's dtype, or int8 (per-token scales, keys smoothed by their prompt mean: "
                 "about half the memory, so twice the batch or context fits; logits within ~1e-3 on our reference).")


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[dtype]


def _cache_dtype(kv_cache: str) -> torch.dtype | None:
    return torch.int8 if kv_cache == "int8" else None


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag}: expected positive integers, got {text!r}")
    return values


def fit_cache(model: torch.nn.Module, max_batch: int, max_seq_len: int, fraction: float = 0.6,
              cache_dtype: torch.dtype | None = None) -> int:
    """`max_batch`, reduced (with a warning) so the KV cache (in `cache_dtype`, default the model's) takes at most
    `fraction` of the free GPU memory."""
    emb = model.model.embed_tokens.weight
    if emb.device.type != "cuda":
        return max_batch
    c = model.config
    per_slot = bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                               cache_dtype or emb.dtype) * max_seq_len
    free, _ = torch.cuda.mem_get_info(emb.device)
    fits = max(1, int(free * fraction // per_slot))
    if fits < max_batch:
        log.warning("KV cache for %d x %d tokens does not fit in %.0f%% of free GPU memory; --max-batch %d",
                    max_batch, max_seq_len, fraction * 100, fits)
        click.echo(f"note: --max-batch lowered to {fits} so the KV cache fits in GPU memory "
                   f"(or lower --max-seq-len)", err=True)
        return fits
    return max_batch


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="Compute dtype (auto: bfloat16 on GPU, float32 on CPU).")
@click.option("--model-name", help="Model id clients use (default: the directory name).")
@click.option("--max-concurrent", default=64, show_default=True, type=int,
              help="Requests in flight (running or queued) before new ones get HTTP 429.")
@click.option("--max-tokens", default=1024, show_default=True, type=int, help="Largest max_tokens a request may ask.")
@click.option("--max-prompt-tokens", type=int, help="Longest prompt accepted (default: the context length - 1).")
@click.option("--max-batch", default=32, show_default=True, type=int,
              help="Requests decoded together (KV cache slots).")
@click.option("--max-seq-len", type=int, help="Prompt + completion tokens per request (default: the model's context).")
@click.option("--attention", type=click.Choice(["sdpa", "sage"]), default="sdpa", show_default=True,
              help="Prefill attention (sage: SageAttention INT8/FP8 kernels on GPU).")
@click.option("--no-cuda-graphs", is_flag=True, help="Run decode steps eagerly on GPU.")
@click.option("--kv-cache", type=click.Choice(KV_CACHE_CHOICES), default="model", show_default=True,
              help=KV_CACHE_HELP)
@click.option("--shutdown-grace", default=5.0, show_default=True, type=float,
              help="Seconds running requests may go on after Ctrl-C / SIGTERM before their streams are ended.")
def serve(artifact: Path, host: str, port: int, device: str | None, dtype: str, model_name: str | None,
          max_concurrent: int, max_tokens: int, max_prompt_tokens: int | None, max_batch: int,
          max_seq_len: int | None, attention: str, no_cuda_graphs: bool, kv_cache: str,
          shutdown_grace: float) -> None:
    """Serve a decoder ARTIFACT (or checkpoint) over an OpenAI-compatible HTTP API (/v1/completions, SSE)."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError("lowc serve needs uvicorn and FastAPI: pip install 'lowc[serve]'") from None
    from .engine import Engine
    from .load import load
    from .serve import ServeLimits, create_app

    if not 0 < port < 65536:
        raise UsageError(f"--port: expected 1..65535, got {port}")
    if max_batch < 1:
        raise UsageError(f"--max-batch: expected a positive number, got {max_batch}")
    limits = ServeLimits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_concurrent=max_concurrent,
                         shutdown_grace_s=shutdown_grace)
    limits.validate()
    device = _device(device)
    model = load(artifact, device=device, dtype=_dtype(dtype, device))
    if getattr(model, "kind", None) != "decoder":
        raise UsageError(f"{artifact}: lowc serve runs decoders; this model is an encoder")
    seq_len = max_seq_len or model.config.max_position_embeddings
    cache_dtype = _cache_dtype(kv_cache)
    engine = Engine(model, max_batch=fit_cache(model, max_batch, seq_len, cache_dtype=cache_dtype),
                    max_seq_len=seq_len, cuda_graphs=False if no_cuda_graphs else None, attention=attention,
                    cache_dtype=cache_dtype)
    app = create_app(engine, model_name or Path(artifact).resolve().name, limits)

    class DrainingServer(uvicorn.Server):
        """On Ctrl-C / SIGTERM first tell the engine to finish (or end) running streams, then stop as usual."""

        def handle_exit(self, sig, frame) -> None:
            app.state.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=int(shutdown_grace) + 5)
    click.echo(f"serving {artifact} as '{app.state.lowc.model_name}' on http://{host}:{port} "
               f"({device}, batch {engine.max_batch}, context {engine.max_seq_len})", err=True)
    try:
        DrainingServer(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down cleanly
        pass
    click.echo("lowc serve: stopped", err=True)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True)
@click.option("--prefill", default="512,2048,8192", show_default=True,
              help="Prompt lengths for prefill throughput (capped by the model's positions).")
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Decode batch sizes.")
@click.option("--prompt-tokens", default=128, show_default=True, type=int, help="Prompt length of decode runs.")
@click.option("--new-tokens", default=64, show_default=True, type=int, help="Tokens generated per decode run.")
@click.option("--attention", type=click.Choice(["sdpa", "sage"]), default="sdpa", show_default=True)
@click.option("--no-cuda-graphs", is_flag=True, help="Decode eagerly on GPU.")
@click.option("--kv-cache", type=click.Choice(KV_CACHE_CHOICES), default="model", show_default=True,
              help=KV_CACHE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--shapes", default="llama-2-7b,llama-2-70b", show_default=True,
              help="bench kernels: model names (llama-2-7b, llama-2-70b) or NxK weight shapes, comma-separated.")
@click.option("--tokens", default="1,16,128,4096", show_default=True, help="bench kernels: token counts.")
@click.option("--bits", default="4,6,8", show_default=True, help="bench kernels: weight bits.")
@click.option("--kernels", "kernel_names", default="wa16,wa8", show_default=True,
              help="bench kernels: which GEMMs to time (wa16: A16 weights-only, wa8: A8/A6).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="bench kernels: table file (default: lowc/kernels/tables/<this GPU>.json, merged).")
def bench(path: Path, device: str | None, dtype: str, prefill: str, batches: str, prompt_tokens: int,
          new_tokens: int, attention: str, no_cuda_graphs: bool, kv_cache: str, as_json: bool, shapes: str,
          tokens: str,
          bits: str, kernel_names: str, out: Path | None) -> None:
    """Prefill / decode tokens/s, time to first token and GPU memory of an artifact or HF checkpoint at PATH.

    `lowc bench kernels` instead measures the fastest low-bit GEMM config for every shape, token count and bit
    width on this GPU and writes the dispatch table the runtime reads (lowc/kernels/tables/<device>.json).
    """
    if str(path) == "kernels" and not path.exists():
        _bench_kernels(shapes, _ints(tokens, "--tokens"), _ints(bits, "--bits"), kernel_names, out)
        return
    from .bench import run_bench

    device = _device(device)
    if prompt_tokens < 1 or new_tokens < 2:
        raise UsageError("--prompt-tokens must be >= 1 and --new-tokens >= 2")
    out = run_bench(path, device=device, dtype=_dtype(dtype, device), prefill=_ints(prefill, "--prefill"),
                    batches=_ints(batches, "--batch"), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                    cuda_graphs=False if no_cuda_graphs else None, attention=attention,
                    cache_dtype=_cache_dtype(kv_cache))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from ..console import format_bytes

    table = Table(title=f"{out['model']}  ({out['device']}, {out['dtype']}, attention {out['attention']}, "
                        f"KV cache {out['kv_cache']})")
    table.add_column("case")
    table.add_column("result", justify="right")
    for row in out["results"]:
        unit = row["metric"]
        value = f"{row['value']:,.1f} {unit}" if unit == "tokens/s" else f"{row['value']:.1f} {unit}"
        table.add_row(row["case"], value)
    table.add_row("weights in memory", format_bytes(out["weight_bytes"]))
    if "peak_gpu_memory_bytes" in out:
        table.add_row("peak GPU memory", format_bytes(out["peak_gpu_memory_bytes"]))
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)


def _bench_kernels(shapes: str, tokens: list[int], bits: list[int], kernel_names: str, out: Path | None) -> None:
    from ..kernels.dispatch import LLAMA_SHAPES, save_table, tune

    kernels = [k.strip() for k in kernel_names.split(",") if k.strip()]
    if not kernels or any(k not in ("wa16", "wa8") for k in kernels):
        raise UsageError(f"--kernels takes wa16 and/or wa8, got {kernel_names!r}")
    if any(b not in (4, 6, 8) for b in bits) or any(t < 1 for t in tokens):
        raise UsageError("--bits takes 4, 6, 8; --tokens positive numbers")
    pairs: list[tuple[int, int]] = []
    for item in (s.strip().lower() for s in shapes.split(",") if s.strip()):
        if item in LLAMA_SHAPES:
            pairs += LLAMA_SHAPES[item]
        elif re.fullmatch(r"\d+x\d+", item):
            pairs.append(tuple(int(v) for v in item.split("x")))
        else:
            raise UsageError(f"--shapes: unknown '{item}' (model names: {', '.join(LLAMA_SHAPES)}, or NxK)")
    if not torch.cuda.is_available():
        raise UsageError("lowc bench kernels measures GPU kernels: CUDA is not available on this machine")
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("timing kernel configs", total=len(pairs) * len(bits) * len(tokens) * len(kernels))
        entries = tune(dict.fromkeys(pairs), tokens, bits, kernels, on_key=lambda msg: progress.update(
            task, advance=1, description=msg))
    command = "lowc bench kernels " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "lowc bench kernels"
    path = save_table(entries, out, command=command.strip())
    click.echo(f"{len(entries)} kernel choices for {torch.cuda.get_device_name()} written to {path}")
