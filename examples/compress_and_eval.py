"""Compress a Hugging Face Llama checkpoint with lowc's Python API, then measure and use the artifact.

    python examples/compress_and_eval.py ../shared/models/ref-llama-wt2 ../shared/data/wikitext-2/test.txt
"""

import sys
import tempfile
from pathlib import Path

import lowc
from lowc.runtime import evaluate
from lowc.runtime.generate import SamplingConfig, generate


def perplexity(path: Path, data: Path, tokens: int = 4096) -> float:
    model = lowc.load(path)
    ids = evaluate.perplexity_ids(model.tokenizer, evaluate.read_lines(data), tokens)
    return evaluate.perplexity(model, ids, seqlen=256)["perplexity"]


def main(checkpoint: str, data: str) -> None:
    out = Path(tempfile.mkdtemp()) / "artifact"
    lowc.compress(checkpoint, out, lowc.Recipe(vnm="64:2:5", wbits=6))
    print(f"dense perplexity      {perplexity(Path(checkpoint), Path(data)):.2f}")
    print(f"64:2:5 + W6 perplexity {perplexity(out, Path(data)):.2f}")
    model = lowc.load(out)
    print(generate(model, "The history of the city", SamplingConfig(max_new_tokens=20)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
