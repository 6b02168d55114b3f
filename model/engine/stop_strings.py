"""StopStringMatcher: finds stop strings in a text that grows at its end, at a bounded cost per new character.

One Knuth-Morris-Pratt automaton per stop string: its state is the length of the longest tail of the text that is
a prefix of the stop string. A new character moves each state in amortised O(1), so a step's cost depends on the
characters it adds and the number of stop strings, never on the text's length or the stop strings' lengths (a
rescan of the text's tail costs up to their square). The largest state is also what a stream must hold back.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1024)
def _fallbacks(stop: str) -> tuple[int, ...]:
    """fallback[i]: the longest proper prefix of stop[:i + 1] that is also its suffix (the KMP failure function)."""
    fallback = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fallback[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fallback[i] = k
    return tuple(fallback)


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.fallbacks = [_fallbacks(s) for s in self.stops]  # shared by the n choices of a request (cached)
        self.states = [0] * len(self.stops)
        self.fed = 0  # characters of the text seen so far

    def feed(self, text: str) -> tuple[int, str] | None:
        """Advance over text[fed:]. Returns (start, stop string) of the match that starts first among those that
        end in the new characters (ties: the earlier stop string), or None."""
        new, start_at = text[self.fed :], self.fed
        self.fed = len(text)
        best: tuple[int, str] | None = None
        for index, stop in enumerate(self.stops):
            end = self._advance(index, stop, new)
            if end is not None:
                start = start_at + end + 1 - len(stop)
                if best is None or start < best[0]:
                    best = (start, stop)
        return best

    def _advance(self, index: int, stop: str, new: str) -> int | None:
        """Move stop string `index`'s state over `new`; the offset in `new` where it first matched, or None."""
        state, fallback, first = self.states[index], self.fallbacks[index], stop[0]
        matched_at = None
        for offset, char in enumerate(new):
            if state == 0 and char != first:
                continue  # the common case: nothing of the stop string is pending
            while state and char != stop[state]:
                state = fallback[state - 1]
            if char == stop[state]:
                state += 1
            if state == len(stop):
                if matched_at is None:
                    matched_at = offset
                state = fallback[state - 1]
        self.states[index] = state
        return matched_at

    def partial_match_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string (to hold back)."""
        return max(self.states, default=0)
