"""Request text -> prompt token ids. Runs on the tokenizer threads, never on the event loop: encoding a 1 MiB
prompt, a batch of prompts or a chat template takes long enough that every other request would wait meanwhile."""

from __future__ import annotations

from model.tokenizer import Tokenizer
from service.errors import bad_request


def completion_prompt_ids(tokenizer: Tokenizer, vocab_size: int, prompts: list[str | list[int]]) -> list[list[int]]:
    """One token list per prompt (text is encoded, token lists are checked against the vocabulary)."""
    out = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise bad_request("The prompt is empty (it encodes to zero tokens)", "prompt", "empty_prompt")
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} in prompt {k} is outside the vocabulary (size {vocab_size})",
                              "prompt", "invalid_token_id")
        out.append(ids)
    return out


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict], parse_special_tokens_in_content: bool) -> list[int]:
    """The chat template's prompt; special-token text inside message content stays text unless asked otherwise."""
    try:
        prompt = list(tokenizer.apply_chat_template(messages, parse_special_tokens_in_content))
    except Exception as err:  # a template may reject role orders ("roles must alternate")
        raise bad_request(f"The chat template rejected the messages: {err}", "messages", "invalid_messages")
    if not prompt:
        raise bad_request("The messages encode to zero tokens", "messages", "empty_messages")
    return prompt
