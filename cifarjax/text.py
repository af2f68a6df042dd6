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
    """A file or folder name as text that prints, plots and encodes anywhere: bytes that are not UTF-8 (os.listdir's
    surrogate escapes) shown as \\xNN ('caf\\xe9')."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
