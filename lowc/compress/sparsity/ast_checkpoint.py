"""AST checkpoints: safetensors + JSON, written so that a killed process never leaves a broken one behind.

A checkpoint is a directory `ckpt-00000040/` with `student.safetensors` (the trained tensors: latent weights, LoRA,
SLoRB, norms), `masks.safetensors` (bool keep masks), `optimizer.safetensors` (AdamW moments and step counts, keyed
`<param>::<state>`), `extra.safetensors` (fixed inputs such as the input-channel norms masks are scored with)
and `state.json` (step, RNG states as lists of ints, the config, the log so far).

Writing: everything goes into a fresh `ckpt-….tmp-<pid>` directory, files are fsynced, the directory is renamed to
its final name (atomic on POSIX), then the `LATEST` pointer is replaced atomically (temp file + os.replace) and
older checkpoints are removed. A crash at any point leaves `LATEST` naming a complete checkpoint; stray `.tmp-*`
directories are ignored and cleaned up on the next write. No pickle: `torch.load` is never used.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "LATEST"
GROUPS = ("student", "masks", "optimizer", "extra")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 1) -> Path:
    """Write checkpoint `step` under `root` atomically and point LATEST at it; keep the newest `keep` checkpoints.

    `tensors` maps each group in GROUPS to its tensors (full, not sharded). Returns the checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("ckpt-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        for group in GROUPS:
            _save_tensors(tmp / f"{group}.safetensors", tensors.get(group, {}))
        _write_json(tmp / "state.json", {**state, "step": step})  # last: a directory with state.json is complete
        _fsync_dir(tmp)
        if final.exists():  # re-written after a resume from an earlier step
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    pointer = root / f"{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    done = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and ".tmp-" not in p.name)
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (LATEST, else the highest complete `ckpt-*`), or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    done = sorted(p for p in root.glob("ckpt-*") if ".tmp-" not in p.name and (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors by group, state) of a checkpoint directory."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    return {g: load_file(str(path / f"{g}.safetensors")) for g in GROUPS}, state


def clear_checkpoints(root: str | Path) -> None:
    """Remove every checkpoint under `root` (a fresh, non-resumed run)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("ckpt-") or p.name.startswith(LATEST):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def rng_state() -> dict:
    """Torch RNG states (CPU and every CUDA device) as lists of ints, for state.json."""
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "clear_checkpoints", "rng_state",
           "set_rng_state", "checkpoint_name"]
