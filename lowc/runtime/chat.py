"""Chat templates: turn OpenAI-style `messages` into a prompt with the template of the model's tokenizer_config.json.

Hugging Face tokenizers ship their chat format as a Jinja template (`chat_template` in tokenizer_config.json, a
string or a list of named templates). It is rendered here in a sandboxed Jinja environment with the variables
transformers passes (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`), so a model
gets the same prompt as under `tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


class ChatTemplateError(UsageError):
    """The messages do not fit the template (it raised), or the template itself is broken."""


def _token_text(value) -> str:
    """tokenizer_config stores special tokens as a string or as {"content": "..."}."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatTemplate:
    """A compiled chat template with the special tokens it refers to."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ChatTemplateError("chat templates need jinja2 (pip install jinja2)") from None

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters.setdefault("tojson", lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent))
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ending where the assistant's reply starts."""
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatTemplateError(f"messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - templates are user data; any failure is a bad request
            raise ChatTemplateError(f"messages: the chat template failed ({type(e).__name__}: {e})") from None


def load_chat_template(path: str | Path | None) -> ChatTemplate | None:
    """The chat template of a checkpoint/artifact directory, or None when its tokenizer_config.json has none."""
    if path is None:
        return None
    file = Path(path) / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    source = cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if not isinstance(source, str) or not source.strip():
        jinja = Path(path) / "chat_template.jinja"  # newer transformers save it beside the config
        if not jinja.is_file():
            return None
        source = jinja.read_text(encoding="utf-8")
    return ChatTemplate(source, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))
