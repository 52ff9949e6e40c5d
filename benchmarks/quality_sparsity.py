"""One-shot V:N:M quality on the reference model: patterns x importance scores x channel permutation x refit.

    python benchmarks/quality_sparsity.py --model ../shared/models/ref-llama-wt2 --data ../shared/data/wikitext-2 \
        --tokens 32768 --out benchmarks/results/quality_sparsity_cpu.json

Every configuration goes through the public pipeline (`lowc.compress` then the `lowc eval` protocol: WikiText-2 test,
first N tokens, non-overlapping windows of 256, CPU float32). Calibration uses WikiText-2 *valid* only.
Also reports all-MiniLM-L6-v2 at 64:2:5 (embedding cosine vs dense on WikiText-2 test lines).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lowc
from cpu_report import report_header
from lowc.runtime import evaluate


def perplexity(path: Path, lines: list[str], tokens: int) -> float:
    model = lowc.load(path)
    ids = evaluate.perplexity_ids(model.tokenizer, lines, tokens)
    return evaluate.perplexity(model, ids, seqlen=256, progress=False)["perplexity"]


def kept_importance(path: Path) -> dict:
    manifest = json.loads((path / "lowc.json").read_text())
    return manifest["metrics"].get("permutation", {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="folder with test.txt and valid.txt")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--patterns", default="16:2:4,64:2:5,64:2:8")
    p.add_argument("--importance", default="magnitude,wanda,ria")
    p.add_argument("--permute", default="off,on", help="off, on or off,on")
    p.add_argument("--reconstruct", default="none,lstsq", help="solvers to try: none, lstsq, obs (comma separated)")
    p.add_argument("--reconstruct-importance", default="wanda",
                   help="importance scores that are also tried with each refit solver")
    p.add_argument("--reconstruct-patterns", default="64:2:5", help="patterns that are also tried with each solver")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--minilm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    test_lines = evaluate.read_lines(args.data / "test.txt")
    valid = args.data / "valid.txt"
    rows, started = [], time.time()
    dense = perplexity(args.model, test_lines, args.tokens)
    print(f"dense: {dense:.2f}", flush=True)
    results: dict[tuple[str, str, bool, str], float] = {}
    perm_reports = {}
    solvers = args.reconstruct.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in args.patterns.split(","):
            for importance in args.importance.split(","):
                for permute in [v == "on" for v in args.permute.split(",")]:
                    for solver in solvers:
                        if solver != "none" and (importance not in args.reconstruct_importance.split(",")
                                                 or pattern not in args.reconstruct_patterns.split(",")):
                            continue
                        options = dict(vnm=pattern, importance=importance, permute=permute)
                        if importance != "magnitude" or solver != "none":
                            options.update(calib=str(valid), calib_samples=args.calib_samples,
                                           calib_seqlen=args.calib_seqlen)
                        if solver != "none":
                            options["reconstruct"] = solver
                        out = Path(tmp) / f"{pattern.replace(':', '-')}-{importance}-{permute}-{solver}"
                        t0 = time.time()
                        lowc.compress(args.model, out, progress=False, **options)
                        ppl = perplexity(out, test_lines, args.tokens)
                        results[(pattern, importance, permute, solver)] = ppl
                        if permute and solver == "none":
                            perm_reports[(pattern, importance)] = kept_importance(out)
                        case = (f"{pattern} {importance}{' +permute' if permute else ''}"
                                f"{'' if solver == 'none' else ' +refit ' + solver}")
                        rows.append({"case": case, "metric": "ppl", "ours": ppl, "baseline_name": "dense",
                                     "baseline": dense, "ratio": dense / ppl, "ratio_to_dense": ppl / dense,
                                     "seconds": round(time.time() - t0, 1)})
                        print(f"{case:44s} ppl {ppl:9.2f}  x{ppl / dense:.3f} dense", flush=True)
        minilm = None
        if args.minilm:
            try:
                from lowc.demo import minilm_path

                src = minilm_path()
                lines = test_lines[:2000]
                calib = dict(calib=str(valid), calib_samples=64, calib_seqlen=128)
                variants = {"magnitude": {}, "wanda": dict(importance="wanda", **calib),
                            "wanda +refit lstsq": dict(importance="wanda", reconstruct="lstsq", **calib)}
                for importance, extra in variants.items():
                    out = Path(tmp) / f"minilm-{importance.replace(' ', '-')}"
                    lowc.compress(src, out, vnm="64:2:5", progress=False, **extra)
                    m, ref = lowc.load(out), lowc.load(src)
                    texts = evaluate.encoder_texts(lines, m.tokenizer, None, 256)
                    cos = evaluate.embedding_cosine(m, ref, texts)
                    rows.append({"case": f"all-MiniLM-L6-v2 64:2:5 {importance}", "metric": "cos",
                                 "ours": cos["cosine_mean"], "baseline_name": "dense", "baseline": 1.0,
                                 "ratio": cos["cosine_mean"], "texts": cos["texts"]})
                    print(f"MiniLM 64:2:5 {importance}: cosine {cos['cosine_mean']:.4f} over {cos['texts']} lines", flush=True)
                    minilm = cos
            except Exception as e:  # the encoder part is optional; report why it did not run
                print(f"MiniLM part skipped: {e}", file=sys.stderr)

    targets = []
    wanda = results.get(("64:2:5", "wanda", False, "none"))
    best_key = min((k for k in results if k[0] == "64:2:5"), key=results.get, default=None)
    if wanda and best_key:
        targets.append({"name": "best 64:2:5 one-shot recipe >= 10% lower perplexity than Wanda without permutation",
                        "goal": 0.9 * wanda, "measured": results[best_key], "met": results[best_key] <= 0.9 * wanda,
                        "best": " ".join(map(str, best_key))})
    for key in sorted(k for k in results if k[0] == "64:2:5" and not k[2]):
        a, b = results[key], results.get((key[0], key[1], True, key[3]))
        if b is not None:
            refit = "" if key[3] == "none" else f" +refit {key[3]}"
            targets.append({"name": f"permutation lowers 64:2:5 {key[1]}{refit} perplexity", "goal": a, "measured": b,
                            "met": b < a})
    for key, rep in perm_reports.items():
        changes = {layer: r["kept_after"] / r["kept_before"] - 1 for layer, r in rep.get("layers", {}).items()
                   if r["kept_before"]}
        worse = {layer: c for layer, c in changes.items() if c <= 0}
        targets.append({"name": f"permutation raises the importance kept on every permuted layer ({' '.join(key)})",
                        "goal": 0, "measured": len(worse), "met": not worse,
                        "kept_total_change": rep["kept_after"] / rep["kept_before"] - 1,
                        "layers_not_raised": {k: round(v, 6) for k, v in list(worse.items())[:20]}})
    report = {
        **report_header(),
        "protocol": f"WikiText-2 test, first {args.tokens} tokens, windows of 256, float32; calibration "
                    f"{args.calib_samples}x{args.calib_seqlen} tokens of WikiText-2 valid",
        "dense_perplexity": dense,
        "results": rows,
        "targets": targets,
        "seconds": round(time.time() - started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
