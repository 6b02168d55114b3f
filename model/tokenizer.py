"""Tokenizers behind one interface: `encode`, `decode`, `apply_chat_template`, `eos_token_ids`, `vocab_size`, `name`.

`HFTokenizer` reads a checkpoint's `tokenizer.json` with the `tokenizers` library (no transformers, no remote code)
plus `tokenizer_config.json` and the chat template (`chat_template.jinja`, `chat_template.json` or the config's
`chat_template` field), and behaves as transformers' fast tokenizer does: `encode` adds the special tokens of the
tokenizer's post-processor; a rendered chat prompt is encoded without adding them (the template writes them).
"""

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as _FastTokenizer

from model.byte_tokenizer import ByteTokenizer
from model.chat_encoding import encode_chat
from model.chat_template import ChatTemplateError, check_chat_template, render_chat_template


class TokenizerError(ValueError):
    """Tokenizer files we cannot use; the message names the file."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_token_ids: list[int]
    chat_template: str | None  # Jinja; the server's --chat-template replaces it

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (logprobs report them)."""

    def apply_chat_template(self, messages: list[dict], parse_special_tokens_in_content: bool = False,
                            tools: list[dict] | None = None, add_generation_prompt: bool = True,
                            template_kwargs: dict | None = None) -> list[int]:
        """Special-token text inside message content is encoded as text unless asked (model/chat_encoding.py);
        `tools` and `template_kwargs` (e.g. enable_thinking) are template variables, as in transformers."""


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TokenizerError(f"unreadable {path}: {err}") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _chat_template(directory: Path, config: dict) -> str | None:
    """The checkpoint's chat template, compiled once here so that one that does not parse stops the start-up
    (naming its file) instead of failing every chat request."""
    if (path := directory / "chat_template.jinja").is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as err:  # ValueError: not UTF-8
            raise TokenizerError(f"unreadable {path}: {err}") from err
    else:
        if (path := directory / "chat_template.json").is_file():
            template = _read_json(path).get("chat_template")
        else:
            path, template = directory / "tokenizer_config.json", config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str):
            return None
    try:
        check_chat_template(template)
    except ChatTemplateError as err:
        raise TokenizerError(f"{path}: {err}") from err
    return template


class HFTokenizer:
    def __init__(self, directory: str | Path, name: str | None = None, extra_eos_token_ids=()):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {directory} (only fast tokenizers are supported)")
        try:
            self._tok = _FastTokenizer.from_file(str(path))
        except Exception as err:
            raise TokenizerError(f"unreadable {path}: {err}") from err
        config_path = directory / "tokenizer_config.json"
        self.config = _read_json(config_path) if config_path.is_file() else {}
        self.name = name or directory.name
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)  # a count: ids may leave gaps
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.max_token_id = max(vocab.values(), default=-1)
        self.chat_template = _chat_template(directory, self.config)
        self.special_tokens = {
            k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        eos = self._id_of(self.special_tokens["eos_token"])
        self.eos_token_ids = list(dict.fromkeys(([eos] if eos is not None else []) + list(extra_eos_token_ids)))
        self.bos_token_id = self._id_of(self.special_tokens["bos_token"])
        self._plain: _FastTokenizer | None = None  # a copy that reads special-token text as text (made on first use)
        self._byte_table = None  # token id -> bytes (token_bytes; made on first use)

    def check_fits(self, vocab_size: int) -> None:
        """Refuse ids past the model's embedding rows (`vocab_size`), which would index out of range at request
        time (a device-side assert on CUDA)."""
        if self.max_token_id >= vocab_size:
            raise TokenizerError(f"{self.path}: token {self._tok.id_to_token(self.max_token_id)!r} has id "
                                 f"{self.max_token_id}, outside the model's vocab_size {vocab_size} (config.json)")

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (byte-level and byte-fallback pieces resolved; a special token: its
        text), from the grammar engine's copy of this vocabulary (built once, on first use)."""
        if self._byte_table is None:
            from llguidance import LLTokenizer

            self._byte_table = LLTokenizer(self.backend_json())
        if token_id >= self._byte_table.vocab_size:
            return b""
        return self._byte_table.decode_bytes([token_id])

    def backend_json(self) -> str:
        """The `tokenizers` JSON of this tokenizer (the grammar engine builds its vocabulary from it)."""
        return self._tok.to_str()

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    template_kwargs: dict | None = None) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(f"tokenizer {self.name!r} has no chat template")
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(template_kwargs or {})
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, **variables)

    def apply_chat_template(self, messages: list[dict], parse_special_tokens_in_content: bool = False,
                            tools: list[dict] | None = None, add_generation_prompt: bool = True,
                            template_kwargs: dict | None = None) -> list[int]:
        special = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

        def render(msgs, tls, kwargs):
            return self.render_chat(msgs, tls, add_generation_prompt, kwargs)

        return encode_chat(messages, special, render, lambda text: self.encode(text, False), self._encode_plain,
                           parse_special_tokens_in_content, tools, template_kwargs)

    def _encode_plain(self, text: str) -> list[int]:
        if self._plain is None:
            plain = _FastTokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids


def load_tokenizer(directory: str | Path, name: str | None = None, extra_eos_token_ids=()) -> HFTokenizer:
    return HFTokenizer(directory, name, extra_eos_token_ids)


__all__ = ["ByteTokenizer", "ChatTemplateError", "HFTokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"]
