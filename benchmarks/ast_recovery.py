"""AST recovery on the reference model: one-shot V:N:M vs AST vs plain masked fine-tuning at equal steps.

    python benchmarks/ast_recovery.py --model ../shared/models/ref-llama-wt2 --data ../shared/data/wikitext-2 \
        --minutes 10                                   # GPU run: writes benchmarks/results/ast_<device>.json
    python benchmarks/ast_recovery.py --model-shape llama2-7b --random --steps 20    # 7B-shaped, LoRA stages
    python benchmarks/ast_recovery.py --smoke                                        # CPU check of the script
    python benchmarks/ast_recovery.py --curve-steps 200 --out /tmp/c1.json          # loss curve, 1 GPU
    torchrun --nproc-per-node 2 benchmarks/ast_recovery.py --curve-steps 200 --out /tmp/c2.json   # 2 GPUs
    python benchmarks/ast_recovery.py --compare-curves /tmp/c1.json /tmp/c2.json     # -> ast_<device>_distributed.json

Per pattern (64:2:5, 64:2:8): prune one-shot with the best recipe of benchmarks/results/quality_sparsity_cpu.json
(Wanda + channel permutation + least-squares refit, calibration on WikiText-2 *valid*), then train with AST for the
time budget (the step count is set from a short timing run) and, from the same start, with plain masked fine-tuning
for the same steps. Perplexity follows the `lowc eval` protocol: WikiText-2 test, first 32768 tokens, windows of
256. Training uses WikiText-2 valid only. Reports gap recovery ((one-shot - AST) / (one-shot - dense)), the flip-rate
curve, the final flip rate, tokens/s and peak memory, in the results schema of ../shared/DESIGN.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowc
from lowc.compress.sparsity.ast import ASTConfig, is_vnm, run_ast
from lowc.compress.sparsity.slorb import SLoRBLinear
from lowc.compress.sparsity.vnm import VNMSpec
from lowc.runtime import evaluate
from lowc.runtime.packed_linear import PackedLinear

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
}


def device_tag() -> tuple[str, str]:
    """(file tag, description) of the machine."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        tag = next((t for t in ("h200", "h100", "a100") if t in name.lower()), "gpu")
        return tag, name
    return "cpu", f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def best_one_shot(pattern: str) -> dict:
    """The lowest-perplexity one-shot case of `pattern` in the quality_sparsity results (for the report)."""
    path = ROOT / "benchmarks" / "results" / "quality_sparsity_cpu.json"
    if not path.is_file():
        return {}
    rows = [r for r in json.loads(path.read_text())["results"] if r["case"].startswith(pattern + " ")]
    best = min(rows, key=lambda r: r["ours"], default=None)
    return {"case": best["case"], "ppl": best["ours"], "ratio_to_dense": best.get("ratio_to_dense")} if best else {}


def unpack(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the artifact's PackedLinear modules by trainable float32 nn.Linear holding the same weights."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PackedLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.scheme.bias)
            linear.weight.data.copy_(m.dense_weight())
            if m.scheme.bias:
                linear.bias.data.copy_(m.bias.float())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, linear)
    return model.requires_grad_(True)


def with_slorb(model: torch.nn.Module, extra: dict[str, torch.Tensor], group: int) -> torch.nn.Module:
    """Wrap Linears that have SLoRB tensors so that evaluation runs the branch as the runtime would."""
    for key, weight in extra.items():
        name = key[: -len(".slorb.weight")]
        parent, _, attr = name.rpartition(".")
        base = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, SLoRBLinear(base, weight.to(base.weight.device), group))
    return model


def perplexity(model: torch.nn.Module, ids: list[int], device: torch.device) -> float:
    model.to(device).eval()
    return evaluate.perplexity(model, ids, seqlen=256, batch_size=16, progress=False)["perplexity"]


def train_windows(tokenizer, path: Path, seqlen: int, limit: int | None) -> torch.Tensor:
    ids = evaluate.perplexity_ids(tokenizer, evaluate.read_lines(path), None)
    n = len(ids) // seqlen if limit is None else min(limit, len(ids) // seqlen)
    return torch.tensor(ids[: n * seqlen]).view(n, seqlen)


def check_vnm(model: torch.nn.Module, spec: VNMSpec) -> bool:
    return all(is_vnm(m.weight != 0, spec) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n)


def memory_gb(stats: dict) -> float | None:
    b = stats.get("peak_gpu_bytes") or stats.get("peak_rss_bytes")
    return round(b / 2**30, 3) if b else None


def run_ref(args, tag: str) -> tuple[list, list, dict]:
    device = torch.device(args.device)
    dense_model = lowc.load(args.model)
    tok = dense_model.tokenizer
    test_ids = evaluate.perplexity_ids(tok, evaluate.read_lines(args.data / "test.txt"), args.tokens)
    train = train_windows(tok, args.data / "valid.txt", args.seqlen, args.train_windows)
    dense = perplexity(dense_model, test_ids, device)
    print(f"dense {dense:.2f}; training windows {tuple(train.shape)} from valid.txt", flush=True)
    rows, targets, extra_info = [], [], {"dense_perplexity": dense, "train_tokens": int(train.numel()),
                                         "curves": {}}
    for pattern in args.patterns.split(","):
        spec = VNMSpec.parse(pattern)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            lowc.compress(args.model, Path(tmp) / "oneshot", vnm=pattern, importance="wanda", permute=True,
                          reconstruct="lstsq", calib=str(args.data / "valid.txt"), calib_samples=args.calib_samples,
                          calib_seqlen=256, dense_dtype="float32", progress=False, device=args.device)
            start = unpack(lowc.load(Path(tmp) / "oneshot"))
            start.lowc_config = dense_model.lowc_config
            compress_s = time.time() - t0
        oneshot = perplexity(start, test_ids, device)
        print(f"{pattern} one-shot (wanda+permute+lstsq) {oneshot:.2f} ({compress_s:.0f} s)", flush=True)
        teacher = lowc.load(args.model).requires_grad_(False)
        base = dict(lr=args.lr, alpha=args.alpha, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                    mask_interval=args.mask_interval, srste_lambda=args.srste_lambda, device=args.device)

        def train_run(name: str, steps: int, **options) -> tuple[torch.nn.Module, dict, float]:
            model = copy.deepcopy(start)
            config = ASTConfig(steps=steps, **{**base, **options})
            t = time.time()
            torch.set_float32_matmul_precision("high")  # TF32 for training; evaluation stays full float32
            with tempfile.TemporaryDirectory() as work:
                stats = run_ast(model, teacher if not config.baseline else None, pattern, train, config, work,
                                progress=not args.quiet)
            torch.set_float32_matmul_precision("highest")
            wall = time.time() - t
            ppl_model = with_slorb(model, stats["extra_tensors"], config.slorb_group) if config.slorb else model
            ppl = stats["ppl"] = perplexity(ppl_model, test_ids, device)
            stats.pop("extra_tensors")
            print(f"{pattern} {name}: {steps} steps, {wall:.0f} s, ppl {ppl:.2f}, final flip "
                  f"{stats['final_flip_rate']:.2e}, {stats['tokens_per_second']:.0f} tok/s, mem {memory_gb(stats)} GB",
                  flush=True)
            assert check_vnm(model, spec), "weights are not exactly V:N:M after training"
            return model, stats, wall

        steps = args.steps
        if steps is None:  # size the run to the time budget from a short timed run
            _, probe, _ = train_run("timing probe", args.probe_steps, checkpoint_every=0)
            per_step = probe["train_seconds"] / args.probe_steps
            steps = max(10, int(args.minutes * 60 * 0.85 / per_step))
            if args.max_epochs:  # the training text is small (WikiText-2 valid): do not loop over it forever
                steps = min(steps, max(10, int(args.max_epochs * len(train) / args.batch_size)))
        variants = [("AST", {})] + ([("AST+SLoRB", {"slorb": True})] if args.slorb else [])
        variants.append(("masked fine-tuning", {"baseline": True}))
        results = {}
        for name, options in variants:
            _, stats, wall = train_run(name, steps, **options)
            results[name] = (stats, wall)
        extra_info["curves"][pattern] = {name: {"flip_rate": s["flip_rate_curve"]} for name, (s, _) in results.items()}
        for name, (stats, wall) in results.items():
            extra_info.setdefault("runs", {})[f"{pattern} {name}"] = {
                k: v for k, v in stats.items() if k not in ("config", "flip_rate_curve")}
        extra_info.setdefault("epochs", {})[pattern] = round(steps * args.batch_size / len(train), 2)
        rows_pattern(rows, targets, pattern, dense, oneshot, results, steps, args, tag)
    return rows, targets, extra_info


def rows_pattern(rows, targets, pattern, dense, oneshot, results, steps, args, tag) -> None:
    ast_stats, ast_wall = results["AST"]
    ft_stats, _ = results["masked fine-tuning"]
    ast_ppl, ft_ppl = ast_stats["ppl"], ft_stats["ppl"]
    gap = 100 * (oneshot - ast_ppl) / (oneshot - dense) if oneshot > dense else float("nan")
    ft_gap = 100 * (oneshot - ft_ppl) / (oneshot - dense) if oneshot > dense else float("nan")
    best = best_one_shot(pattern)
    rows += [
        {"case": f"{pattern} AST ({steps} steps) vs one-shot wanda+permute+lstsq", "metric": "ppl", "ours": ast_ppl,
         "baseline_name": "one-shot (this run)", "baseline": oneshot, "ratio": oneshot / ast_ppl,
         "gap_recovered_pct": gap, "ratio_to_dense": ast_ppl / dense, "train_seconds": ast_stats["train_seconds"],
         "wall_seconds": round(ast_wall, 1), "best_one_shot_in_quality_sparsity": best},
        {"case": f"{pattern} AST vs plain masked fine-tuning, {steps} steps each", "metric": "ppl", "ours": ast_ppl,
         "baseline_name": "masked fine-tuning (CE, fixed mask)", "baseline": ft_ppl, "ratio": ft_ppl / ast_ppl,
         "baseline_gap_recovered_pct": ft_gap},
        {"case": f"{pattern} AST training throughput", "metric": "tokens/s", "ours": ast_stats["tokens_per_second"],
         "baseline_name": "masked fine-tuning", "baseline": ft_stats["tokens_per_second"],
         "ratio": ast_stats["tokens_per_second"] / ft_stats["tokens_per_second"],
         "peak_memory_gb": memory_gb(ast_stats)},
    ]
    if "AST+SLoRB" in results:
        s, _ = results["AST+SLoRB"]
        rows.append({"case": f"{pattern} AST+SLoRB vs AST, {steps} steps", "metric": "ppl", "ours": s["ppl"],
                     "baseline_name": "AST", "baseline": ast_ppl, "ratio": ast_ppl / s["ppl"]})
    if pattern == "64:2:5":
        minutes = ast_wall / 60
        targets.append({"name": "AST recovers >= 60% of the one-shot 64:2:5 -> dense perplexity gap within 10 "
                                "minutes on one H100 (ref model)", "goal": 60, "measured": round(gap, 2),
                        "met": bool(gap >= 60 and minutes <= 10 and tag == "h100" and not args.smoke),
                        "minutes": round(minutes, 2), "device": tag})
    targets.append({"name": f"{pattern}: AST beats plain masked fine-tuning with the same steps",
                    "goal": ft_ppl, "measured": ast_ppl, "met": bool(ast_ppl < ft_ppl)})
    targets.append({"name": f"{pattern}: final mask flip rate < 1e-3", "goal": 1e-3,
                    "measured": ast_stats["final_flip_rate"], "met": bool(ast_stats["final_flip_rate"] < 1e-3)})


def run_shape(args, tag: str) -> tuple[list, list, dict]:
    """A random Llama of a given shape: AST steps with three-staged LoRA; tokens/s and peak memory."""
    from lowc.models import build_model

    device = torch.device(args.device)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 1,
              **SHAPES[args.model_shape]}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        student = build_model(config)
        teacher = build_model(config).requires_grad_(False)
    torch.set_default_dtype(default)
    teacher.load_state_dict(student.state_dict())
    ids = torch.randint(3, config["vocab_size"], (args.batch_size * 4, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    cfg = ASTConfig(steps=args.steps or 20, lr=args.lr, batch_size=args.batch_size, lora=True,
                    lora_rank=args.lora_rank, lora_dense_fraction=0.1, lora_reprune_fraction=0.1,
                    mask_interval=max(1, (args.steps or 20) // 10), mask_importance="magnitude", checkpoint_every=0,
                    device=args.device, teacher_topk=args.teacher_topk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as work:
        stats = run_ast(student, teacher, args.patterns.split(",")[0], ids, cfg, work, progress=not args.quiet)
    params = sum(p.numel() for p in student.parameters())
    mem = memory_gb(stats)
    print(f"{args.model_shape} random ({params / 1e9:.2f} B params, {dtype}): {cfg.steps} steps with LoRA stages, "
          f"{stats['tokens_per_second']:.0f} tokens/s, peak memory {mem} GB", flush=True)
    stats.pop("extra_tensors")
    rows = [{"case": f"{args.model_shape}-shaped random Llama, AST + three-staged LoRA (rank {args.lora_rank}), "
                     f"batch {args.batch_size}x{args.seqlen}, {args.patterns.split(',')[0]}",
             "metric": "tokens/s", "ours": stats["tokens_per_second"], "baseline_name": None, "baseline": None,
             "ratio": None, "peak_memory_gb": mem, "parameters": params, "loss_first": stats["loss_first"],
             "loss_last": stats["loss_last"]}]
    targets = [{"name": "Llama-2-7B-shaped model runs AST steps with LoRA stages on one H100 within memory",
                "goal": "runs; peak memory < 80 GB", "measured": mem,
                "met": bool(tag == "h100" and args.model_shape == "llama2-7b" and mem is not None and mem < 80),
                "tokens_per_second": stats["tokens_per_second"]}]
    return rows, targets, {"shape": args.model_shape, "run": {k: v for k, v in stats.items() if k != "config"}}


def init_distributed(args) -> int:
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPU) and use this rank's GPU; returns the rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist

    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def run_curve(args, tag: str) -> tuple[list, list, dict]:
    """The AST loss curve of `--curve-steps` steps on the one-shot 64:2:5 ref model (1 process or torchrun)."""
    from lowc.compress.sparsity import ast_dist

    device = torch.device(args.device)
    dense_model = lowc.load(args.model)
    train = train_windows(dense_model.tokenizer, args.data / "valid.txt", args.seqlen, args.train_windows)
    pattern = args.patterns.split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        lowc.compress(args.model, Path(tmp) / "oneshot", vnm=pattern, importance="wanda", permute=True,
                      reconstruct="lstsq", calib=str(args.data / "valid.txt"), calib_samples=args.calib_samples,
                      calib_seqlen=256, dense_dtype="float32", progress=False, device=args.device)
        student = unpack(lowc.load(Path(tmp) / "oneshot"))
    student.lowc_config = dense_model.lowc_config
    teacher = lowc.load(args.model).requires_grad_(False)
    config = ASTConfig(steps=args.curve_steps, lr=args.lr, batch_size=args.batch_size, checkpoint_every=0,
                       mask_interval=args.mask_interval, srste_lambda=args.srste_lambda, device=str(device))
    work = Path(tempfile.gettempdir()) / f"ast_curve_{ast_dist.world_size()}"
    stats = run_ast(student, teacher, pattern, train, config, work, progress=not args.quiet)
    losses = [json.loads(line)["loss"] for line in Path(stats["log"]).read_text().splitlines()] \
        if ast_dist.rank() == 0 else []
    world = ast_dist.world_size()
    print(f"{pattern} AST loss curve on {world} process(es): {losses[:3]} ... {losses[-3:]}", flush=True)
    rows = [{"case": f"{pattern} AST loss curve, {world} GPU(s), global batch {args.batch_size}", "metric": "tokens/s",
             "ours": stats["tokens_per_second"], "baseline_name": None, "baseline": None, "ratio": None,
             "peak_memory_gb": memory_gb(stats)}]
    return rows, [], {"world_size": world, "loss_curve": losses}


def compare_curves(paths: list[Path]) -> tuple[list, list, dict]:
    """Target: the loss curves of two `--curve-steps` runs (1 and G GPUs, same global batch) agree."""
    a, b = (json.loads(p.read_text()) for p in paths)
    la, lb = a["loss_curve"], b["loss_curve"]
    n = min(len(la), len(lb))
    rel = max(abs(x - y) / abs(x) for x, y in zip(la[:n], lb[:n]))
    target = {"name": f"AST under torchrun on {b['world_size']} GPUs follows the {a['world_size']}-GPU loss curve at "
                      "equal global batch (max relative loss difference over all steps)",
              "goal": 0.01, "measured": rel, "met": bool(rel < 0.01 and len(la) == len(lb)), "steps": n}
    return [], [target], {"curves": {str(a["world_size"]): la, str(b["world_size"]): lb}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "ref-llama-wt2")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    p.add_argument("--patterns", default="64:2:5,64:2:8")
    p.add_argument("--tokens", type=int, default=32768, help="test tokens for perplexity")
    p.add_argument("--minutes", type=float, default=10.0, help="AST time budget per pattern (sets the steps)")
    p.add_argument("--steps", type=int, help="fixed AST steps (overrides --minutes)")
    p.add_argument("--probe-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--mask-interval", type=int, default=10)
    p.add_argument("--srste-lambda", type=float, default=0.05)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--train-windows", type=int, help="at most this many training windows of valid.txt")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--slorb", action="store_true", help="also run AST + SLoRB")
    p.add_argument("--model-shape", choices=sorted(SHAPES), help="random model of this shape instead of --model")
    p.add_argument("--random", action="store_true", help="with --model-shape: random weights (required)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--teacher-topk", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="a few steps on a few tokens (CPU check of the script)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--alpha", type=float, default=0.5, help="distillation weight (KL vs cross-entropy)")
    p.add_argument("--max-epochs", type=float, default=0.0,
                   help="cap the time-budgeted steps at this many passes over the training windows (0: no cap)")
    p.add_argument("--curve-steps", type=int, help="only record the AST loss curve of N steps (run it under torchrun "
                                                    "with G GPUs and without, then --compare-curves)")
    p.add_argument("--compare-curves", type=Path, nargs=2, metavar=("ONE_GPU_JSON", "G_GPU_JSON"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rank = init_distributed(args)
    if args.model_shape and not args.random:
        p.error("--model-shape builds a random model: pass --random too")
    if args.smoke:
        args.tokens, args.steps, args.probe_steps = min(args.tokens, 2048), args.steps or 3, 2
        args.train_windows, args.calib_samples, args.batch_size = args.train_windows or 16, 8, min(args.batch_size, 4)
        args.seqlen = min(args.seqlen, 128) if args.model_shape else args.seqlen
    tag, description = device_tag()
    started = time.time()
    if args.compare_curves:
        rows, targets, info = compare_curves(args.compare_curves)
    elif args.curve_steps:
        rows, targets, info = run_curve(args, tag)
    elif args.model_shape:
        rows, targets, info = run_shape(args, tag)
    else:
        rows, targets, info = run_ref(args, tag)
    if rank != 0:
        return
    report = {
        "device": description,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "lowc": lowc.__version__,
                     "python": platform.python_version()},
        "command": " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "protocol": "WikiText-2 test, first %d tokens, windows of 256 (lowc eval protocol); training and calibration "
                    "on WikiText-2 valid only" % args.tokens,
        "smoke": args.smoke,
        "results": rows,
        "targets": targets,
        **info,
        "seconds": round(time.time() - started),
    }
    out = args.out
    if out is None:
        kind = ("_" + args.model_shape if args.model_shape else f"_curve{info['world_size']}" if args.curve_steps
                else "_distributed" if args.compare_curves else "")
        name = f"ast_{tag}{kind}.json"
        out = (Path(tempfile.gettempdir()) if args.smoke else ROOT / "benchmarks" / "results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
