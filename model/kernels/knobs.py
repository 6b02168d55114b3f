"""On/off switches from the environment for kernel variants that stay opt-in until a GPU run has checked and timed
them. Strict: a value other than 0 or 1 is an error naming the variable, never silently "off"."""

import os


def env_switch(name: str, default: bool | None = False) -> bool | None:
    """1 → True, 0 → False, unset → `default` (None where the caller decides by itself)."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: want 0 or 1")
    return value == "1"
