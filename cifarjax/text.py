"""Wording in what the commands print: counts with their noun, durations in a readable unit, names as text."""
import os


def plural(n: int, word: str) -> str:
    """'1 epoch', '20 epochs'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def duration(seconds: float) -> str:
    """'45 s', '3.5 min', '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def printable(name: str) -> str:
    """A file or folder name that prints anywhere: non-UTF-8 bytes (os.listdir's surrogate escapes) as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
