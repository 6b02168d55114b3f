"""Request text -> prompt token ids. Runs on the tokenizer threads, never on the event loop: encoding a 1 MiB
prompt, a batch of prompts or a chat template takes long enough that every other request would wait meanwhile."""

from __future__ import annotations

from model.tokenizer import Tokenizer
from service.errors import bad_request

RESERVED_TEMPLATE_VARIABLES = ("messages", "tools", "add_generation_prompt")


def completion_prompt_ids(tokenizer: Tokenizer, vocab_size: int, prompts: list[str | list[int]],
                          add_special_tokens: bool = True) -> list[list[int]]:
    """One token list per prompt (text is encoded, token lists are checked against the vocabulary)."""
    out = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if isinstance(prompt, str) \
            else list(prompt)
        if not ids:
            raise bad_request("The prompt is empty (it encodes to zero tokens)", "prompt", "empty_prompt")
        if max(ids) >= vocab_size:  # in C: a generator over every token cost ~1 µs a token on the event loop
            bad = next(t for t in ids if t >= vocab_size)
            raise bad_request(f"Token id {bad} in prompt {k} is outside the vocabulary (size {vocab_size})",
                              "prompt", "invalid_token_id")
        out.append(ids)
    return out


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict], parse_special_tokens_in_content: bool,
                    tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    template_kwargs: dict | None = None) -> list[int]:
    """The chat template's prompt; special-token text inside message content stays text unless asked otherwise."""
    for name in RESERVED_TEMPLATE_VARIABLES:
        if name in (template_kwargs or {}):
            raise bad_request(f"chat_template_kwargs may not set {name!r} (it has its own field)",
                              f"chat_template_kwargs.{name}")
    try:
        prompt = list(tokenizer.apply_chat_template(messages, parse_special_tokens_in_content, tools=tools,
                                                    add_generation_prompt=add_generation_prompt,
                                                    template_kwargs=template_kwargs))
    except Exception as err:  # a template may reject role orders ("roles must alternate")
        raise bad_request(f"The chat template rejected the messages: {err}", "messages", "invalid_messages")
    if not prompt:
        raise bad_request("The messages encode to zero tokens", "messages", "empty_messages")
    return prompt
