"""How much of a streamed text's tail must wait: the longest suffix that is a proper prefix of a marker (`<tool_call>`,
`</think>`), since the next delta may complete it."""


def partial_marker_len(text: str, marker: str) -> int:
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
