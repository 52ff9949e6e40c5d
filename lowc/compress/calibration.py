"""Calibration: tokenized samples from a text file and per-layer activation statistics.

The runner walks the model one decoder (or encoder) layer at a time: the hidden states of all calibration samples
enter a layer, the inputs of that layer's Linears are measured through hooks, and the layer's outputs become the next
layer's inputs. Only one layer's intermediate activations (for one batch) exist at a time. Statistics are taken on
the dense model (pruning earlier layers first made 64:2:5 worse on our reference model, see REFERENCE.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from ..console import progress_bar
from ..errors import UsageError
from ..runtime.evaluate import read_lines


def calibration_ids(tokenizer, path: str | Path, samples: int, seqlen: int) -> torch.Tensor:
    """`samples` consecutive windows of `seqlen` tokens [samples, seqlen] (lines encoded as for evaluation)."""
    if samples < 1 or seqlen < 2:
        raise UsageError(f"--calib-samples / --calib-seqlen: expected >= 1 and >= 2, got {samples} and {seqlen}")
    lines = read_lines(path) if Path(path).is_file() else None
    if lines is None:
        raise UsageError(f"--calib: no such file {path}")
    need = samples * seqlen
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    ids: list[int] = []
    for start in range(0, len(lines), 512):
        for encoded in tokenizer.encode_batch(lines[start:start + 512], special_tokens=False):
            ids.extend(encoded)
            if eos is not None:
                ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise UsageError(f"--calib: {path} has {len(ids)} tokens but {samples} samples x {seqlen} tokens = {need} are "
                         "needed; lower --calib-samples or --calib-seqlen, or give more text")
    return torch.tensor(ids[:need], dtype=torch.long).view(samples, seqlen)


def layer_runners(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> Iterator[tuple[str, torch.nn.Module, callable]]:
    """Yield (prefix, layer, run) where run(x) -> layer output for a batch of hidden states."""
    if model.kind == "decoder":
        body = model.model
        seqlen = ids.shape[1]
        cos, sin = body.rotary_emb(torch.arange(seqlen, device=ids.device), torch.float32)
        for i, layer in enumerate(body.layers):
            yield f"model.layers.{i}", layer, lambda x, layer=layer: layer(x, cos, sin, None)
    else:
        for i, layer in enumerate(model.encoder.layer):
            yield f"encoder.layer.{i}", layer, lambda x, layer=layer: layer(x, None)


def embed_inputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if model.kind == "decoder":
        return model.model.embed_tokens(ids).float()
    return model.embeddings(ids, torch.zeros_like(ids)).float()


def walk_layers(model: torch.nn.Module, ids: torch.Tensor, observe: Callable[[str, torch.nn.Module], Callable],
                description: str, after: Callable[[str, torch.nn.Module], None] | None = None,
                batch_size: int = 8, progress: bool = True) -> None:
    """Run the calibration samples through the model one layer at a time.

    For every Linear inside a layer, `observe(name, linear)` returns a forward pre-hook that sees its inputs. When
    `after(prefix, layer)` is given it runs once the layer has seen all samples (e.g. to change its weights), and the
    layer's outputs are then recomputed so that the next layer sees the changed one.

    The layers run on `ids.device`: each is moved there for its turn and back afterwards, so a model held in CPU
    memory calibrates on a GPU that only needs one layer and the hidden states of the samples.
    """
    device = ids.device
    home = next(model.parameters()).device
    hidden = torch.cat([embed_inputs(model, ids[i:i + batch_size].to(home)).to(device)
                        for i in range(0, len(ids), batch_size)])
    runners = list(layer_runners(model, ids, batch_size))

    def forward(run) -> torch.Tensor:
        return torch.cat([run(hidden[i:i + batch_size]) for i in range(0, len(hidden), batch_size)])

    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(runners))
        for prefix, layer, run in runners:
            layer.to(device)
            handles = [m.register_forward_pre_hook(observe(f"{prefix}.{n}", m)) for n, m in layer.named_modules()
                       if isinstance(m, torch.nn.Linear)]
            try:
                outputs = forward(run)
            finally:
                for h in handles:
                    h.remove()
            if after is not None:
                after(prefix, layer)
                outputs = forward(run)
            layer.to(home)
            hidden = outputs
            bar.advance(task)


@torch.no_grad()  # not inference_mode: layers moved to another device must stay ordinary tensors
def input_norms(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8,
                progress: bool = True) -> dict[str, torch.Tensor]:
    """||x_j||_2 over all calibration tokens for the input channels of every Linear inside the layers [K]."""
    sums: dict[str, torch.Tensor] = {}

    def observe(name: str, linear: torch.nn.Module):
        def record(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        return record

    walk_layers(model, ids, observe, "calibrating", batch_size=batch_size, progress=progress)
    return {name: s.sqrt().float().cpu() for name, s in sums.items()}
