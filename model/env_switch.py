"""Boolean environment switches (STATICMOE_*), read the same way by the CLI (service/cli.py) and the engine's
defaults (model/engine/config.py): a word nobody meant as a boolean is an error, never silently "off"."""

import os

TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def env_switch(name: str) -> bool | None:
    """The boolean in environment variable `name`; None when unset. Raises ValueError for any other word."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")
