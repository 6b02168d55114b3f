"""Incremental detokenization and the stop conditions (EOS, stop token ids, stop strings, max tokens).

Text is decoded over a short window of recent tokens, so each step costs O(window), and a token that ends inside a
multi-byte character is held back until the character is complete. That hold is bounded: a character spans at most 4
bytes, so text still ending in U+FFFD after more tokens than an unfinished character can span (stray UTF-8
continuation bytes, say) is released but for the last few tokens; the window stays short and the text is still the
full decode's. Text that could be the start of a stop string is held back too, so a stream never shows (part of) a
stop string that later ends the request. Stop strings are matched by StopStringMatcher, whose cost per new character
does not grow with the text or the stop strings.
"""

from model.engine.sequence import Sequence
from model.engine.stop_strings import StopStringMatcher

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first outputs (spacing of word-piece tokenizers)
INCOMPLETE_CHAR = "\ufffd"
HELD_TOKENS = 3  # the most tokens an unfinished character can span (4 bytes at most, one still to come)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])  # context + outputs (text tokens only)
        self.prefix_offset = 0  # window start: decoded text of [prefix_offset:read_offset] is already in `text`
        self.read_offset = len(self.token_ids)
        # A prompt that ends inside a character (token ids cut mid-character): its trailing tokens count as not
        # yet read, so the output token that completes the character brings it (else the decoded length does not
        # grow and the character is lost). Bounded: a UTF-8 character spans at most 4 tokens.
        for _ in range(3):
            if not self.read_offset or not tokenizer.decode(self.token_ids[: self.read_offset],
                                                            skip_special_tokens=skip_special_tokens
                                                            ).endswith(INCOMPLETE_CHAR):
                break
            self.read_offset -= 1
        self.stop = list(stop)
        self.matcher = StopStringMatcher(self.stop)
        self.text = ""  # output text so far (cut before a stop string once one is found)
        self.emitted = 0  # characters of `text` already handed out

    def add_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self._decode(flush=False)

    def _decode(self, flush: bool) -> None:
        if self.read_offset == len(self.token_ids):
            return
        skip = self.skip_special_tokens
        done = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(full) > len(done) and (flush or not full.endswith(INCOMPLETE_CHAR)):
            self._read(full[len(done) :], len(self.token_ids))
        elif len(self.token_ids) - self.read_offset > HELD_TOKENS:
            # Held for longer than an unfinished character lasts: read all but the last HELD_TOKENS tokens, whose
            # bytes may still begin a character, if no character spans the cut: then the two sides decode to the
            # whole (a character cut in two decodes as replacement characters on each side). Else wait a token.
            cut = len(self.token_ids) - HELD_TOKENS
            head = self.tokenizer.decode(self.token_ids[self.prefix_offset : cut], skip_special_tokens=skip)
            if head + self.tokenizer.decode(self.token_ids[cut:], skip_special_tokens=skip) == full:
                self._read(head[len(done) :], cut)

    def _read(self, text: str, end: int) -> None:
        """Take `text` as the text of the tokens up to `end`; the window then starts at the old read offset."""
        self.text += text
        self.prefix_offset, self.read_offset = self.read_offset, end

    def find_stop_string(self, armed: bool = True) -> str | None:
        """Look for a stop string in the text added since the last call; cut the text before it (after it with
        include_stop_str_in_output). Not `armed` (min_tokens not reached yet): the text is scanned, nothing stops."""
        found = self.matcher.feed(self.text)
        if found is None or not armed:
            return None
        start, stop = found
        self.text = self.text[: start + len(stop) if self.include_stop_str_in_output else start]
        self.read_offset = len(self.token_ids)  # held tokens lie past the cut: the finish must not add their text
        return stop

    def take_new_text(self, finished: bool) -> str:
        """Text not yet handed out; while running, withhold a tail that could begin a stop string."""
        if finished:
            self._decode(flush=True)
            end = len(self.text)
        else:
            end = len(self.text) - self.matcher.partial_match_len()
        end = max(end, self.emitted)
        new, self.emitted = self.text[self.emitted : end], end
        return new


def check_stop_token(seq: Sequence, token_id: int, eos_token_ids, max_model_len: int,
                     num_tokens: int | None = None) -> None:
    """The stop conditions that need only token ids (EOS, stop token ids, max_tokens, max_model_len); called right
    after `token_id` was appended, so a finished sequence is not scheduled again. `num_tokens`: the sequence's
    length up to and including `token_id` (default: all of token_ids; less when later tokens are in flight)."""
    params = seq.params
    num_tokens = seq.num_tokens if num_tokens is None else num_tokens
    if not params.ignore_eos and token_id in eos_token_ids:
        seq.finish_reason, seq.stop_reason = "stop", None
    elif token_id in params.stop_token_id_set:
        seq.finish_reason, seq.stop_reason = "stop", token_id
    elif num_tokens - seq.num_prompt_tokens >= params.max_tokens or num_tokens >= max_model_len:
        seq.finish_reason = "length"


def detokenize_and_check_stop_strings(seq: Sequence, token_id: int, num_output_tokens: int | None = None) -> None:
    """Add the token's text (not for a token that stopped the sequence by id) and look for stop strings; a stop
    string also overrides "length" when the same token completes it. `num_output_tokens`: the output's length up to
    and including this token (default: all of it; less when later tokens are in flight)."""
    if seq.finish_reason == "stop" and not seq.stopped_after_text:
        return
    detok: IncrementalDetokenizer = seq.detokenizer
    before = len(detok.text)
    detok.add_token(token_id)
    if len(detok.text) > before:
        produced = seq.num_output_tokens if num_output_tokens is None else num_output_tokens
        stop_string = detok.find_stop_string(armed=produced >= seq.params.min_tokens)
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string


def check_stop(seq: Sequence, token_id: int, eos_token_ids, max_model_len: int) -> None:
    """Both of the above, in order."""
    check_stop_token(seq, token_id, eos_token_ids, max_model_len)
    detokenize_and_check_stop_strings(seq, token_id)
