"""A byte-level tokenizer that needs no files: ids 0-255 are UTF-8 bytes, then a few ChatML special tokens.

It serves the embedded `tiny` model and the random-weight presets, so the service starts with no download. Ids past
its vocabulary (a random-weight preset has a far larger one) decode as byte `id % 256`, so their output stays visible.
"""

import re

from model.chat_encoding import encode_chat
from model.chat_template import render_chat_template

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ByteTokenizer:
    def __init__(self, name: str = "byte", extra_eos_token_ids=()):
        self.name = name
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.eos_token_ids = list(dict.fromkeys([self.special_ids["<|im_end|>"], self.special_ids["<|endoftext|>"],
                                                 *extra_eos_token_ids]))
        self.bos_token_id = None
        self.chat_template = CHATML_TEMPLATE
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes (special-token text as its id); it has no BOS/EOS to add, whatever add_special_tokens."""
        ids = []
        for part in self._split.split(text):
            ids.extend([self.special_ids[part]] if part in self.special_ids else part.encode("utf-8"))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if 256 <= i < self.vocab_size:
                if not skip_special_tokens:
                    out.append(pending.decode("utf-8", errors="replace") + SPECIAL_TOKENS[i - 256])
                    pending = bytearray()
            else:
                pending.append(i % 256)
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its text)."""
        if 256 <= token_id < self.vocab_size:
            return SPECIAL_TOKENS[token_id - 256].encode()
        return bytes([token_id % 256])

    def apply_chat_template(self, messages: list[dict], parse_special_tokens_in_content: bool = False,
                            tools: list[dict] | None = None, add_generation_prompt: bool = True,
                            template_kwargs: dict | None = None) -> list[int]:
        def render(msgs, tls, kwargs):
            return self.render_chat(msgs, tls, add_generation_prompt, kwargs)

        return encode_chat(messages, list(SPECIAL_TOKENS), render, self.encode,
                           lambda text: list(text.encode("utf-8")), parse_special_tokens_in_content, tools,
                           template_kwargs)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    template_kwargs: dict | None = None) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, **(template_kwargs or {}))
