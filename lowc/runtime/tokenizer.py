"""Tokenizer loading from a checkpoint or artifact directory (tokenizer.json through `tokenizers`; no transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LowcError


class TextTokenizer:
    """Encode/decode text the way lowc's models were trained and are evaluated."""

    def __init__(self, path: Path, config: dict):
        from tokenizers import Tokenizer

        file = path / "tokenizer.json"
        if not file.is_file():
            raise LowcError(f"{path}: no tokenizer.json (lowc reads tokenizers in the `tokenizers` JSON format)")
        try:
            self.tok = Tokenizer.from_file(str(file))
        except Exception as e:
            raise LowcError(f"{file}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        # Raw ids: callers choose lengths themselves (evaluation truncates, calibration cuts windows). A tokenizer.json
        # may carry padding and truncation for its training pipeline (sentence-transformers' all-MiniLM-L6-v2 pads
        # every text to 128 tokens), which would put [PAD] tokens inside calibration windows and embedding means.
        self.tok.no_padding()
        self.tok.no_truncation()
        tcfg = {}
        if (path / "tokenizer_config.json").is_file():
            try:
                tcfg = json.loads((path / "tokenizer_config.json").read_text())
            except (OSError, json.JSONDecodeError):
                tcfg = {}
        self.add_bos = bool(tcfg.get("add_bos_token", False))
        eos = config.get("eos_token_id")
        gen = path / "generation_config.json"
        if gen.is_file():
            try:
                eos = json.loads(gen.read_text()).get("eos_token_id", eos)
            except (OSError, json.JSONDecodeError):
                pass
        self.eos_ids: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.bos_id = config.get("bos_token_id")

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special_tokens).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids for generation: raw text, with BOS first where the tokenizer config asks for it."""
        ids = self.encode(text)
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str], special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=special_tokens)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path, config: dict) -> TextTokenizer:
    return TextTokenizer(Path(path), config)
