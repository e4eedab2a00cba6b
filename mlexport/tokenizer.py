"""Tokenizer and chat template for running artifacts, without importing transformers (it is slow to import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlexport.errors import MlexportError


class Tokenizer:
    """``tokenizer.json`` (HF tokenizers) or ``tokenizer.model`` (SentencePiece), plus the chat template."""

    def __init__(self, directory: Path, chat_template: str | None = None) -> None:
        self.directory = directory
        tok_json, tok_model = directory / "tokenizer.json", directory / "tokenizer.model"
        self._sp = None
        if tok_json.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(tok_json))
            self.path = tok_json
        elif tok_model.is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(tok_model))
            self.path = tok_model
        else:
            raise MlexportError(f"{directory} has no tokenizer.json or tokenizer.model; re-export the artifact")
        config: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").is_file():
            config = json.loads((directory / "tokenizer_config.json").read_text())
        jinja = directory / "chat_template.jinja"
        self.chat_template = chat_template or (jinja.read_text() if jinja.is_file() else config.get("chat_template"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token"))

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode(text))
        return self._hf.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's ids as the model expects them: BOS first when its tokenizer adds one (Gemma), unless the text
        (a rendered chat template) already starts with it."""
        ids = self.encode(text)
        if not self.add_bos or self.bos_token is None:
            return ids
        bos = self._sp.bos_id() if self._sp is not None else self._hf.token_to_id(self.bos_token)
        return ids if bos is None or bos < 0 or ids[:1] == [bos] else [bos, *ids]

    def decode(self, ids: list[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def chat_opening(self) -> str | None:
        """What the chat template puts before a user's message (its default system turn and the user header);
        None without a template, or when the template does not show the message verbatim."""
        if not self.chat_template:
            return None
        rendered = self.render_chat(CHAT_MARKER)
        return rendered.split(CHAT_MARKER)[0] if CHAT_MARKER in rendered else None

    def render_chat(self, prompt: str, system: str | None = None) -> str:
        """Apply the model's chat template the way transformers does (add_generation_prompt=True)."""
        if not self.chat_template:
            return prompt
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


CHAT_MARKER = "\x00mlexport-user-text\x00"


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value
