"""Command-line flags from `Config`'s fields, "not given" by default: a new run's settings are Config's defaults, the
`--recipe`, then the typed flags; a resumed run's, its config.json, then the flags that may change on resume."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from typing import Optional

from cifarjax.config import KINDS, Config, fields_for, flag_name
from cifarjax.errors import UserError
from cifarjax.recipes import RECIPES, recipe_config


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error: ...` line (a UserError), not a usage dump."""

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        hints = [self.suggest(a.split("=")[0]) for a in unknown[1].split() if a.startswith("-")] if unknown else []
        hint = "; ".join(f"did you mean {h}?" for h in hints if h)
        raise UserError(f"{message}{'; ' + hint if hint else ''} (see {self.prog} --help)")

    def suggest(self, flag: str) -> Optional[str]:
        """The closest spelling of a mistyped flag, else the flag whose help names its words (--learning-rate: --lr)."""
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
        words = flag.lstrip("-").replace("-", " ").replace("_", " ").lower()
        named = [a.option_strings[-1] for a in self._actions if len(words) > 3 and words in (a.help or "").lower()]
        return (close or named or [None])[0]


def _number(kind: str, text: str):
    """A flag's text as an int or float, refused in Config's words ('x' is not an integer)."""
    try:
        return {"int": int, "float": float}[kind](text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {KINDS[kind][0]}") from None


_TYPES = {"int": lambda text: _number("int", text), "float": lambda text: _number("float", text), "str": str,
          "Optional[str]": str, "tuple": lambda text: tuple(n.strip() for n in text.split(",") if n.strip())}
_METAVARS = {"int": "N", "float": "X", "tuple": "NAME,NAME"}


def add_config_flags(parser: argparse.ArgumentParser, command: str, base: Config, title: str = "settings",
                     nargs: Optional[dict] = None, only: Optional[tuple] = None, shown: Optional[dict] = None) -> None:
    """One flag per Config field offered by `command` (or in `only`), its --help default `base`'s value (or
    `shown`'s text) and the other recipes'; `nargs`: field name -> argparse's nargs."""
    group = parser.add_argument_group(title)
    others = [r for r in RECIPES.get(command, {}).values() if r.name != base.recipe]
    for f in (f for f in fields_for(command) if only is None or f.name in only):
        m, default = f.metadata, (shown or {}).get(f.name, getattr(base, f.name))
        default = "all" if default == () else default
        recipes = "".join(f"; --recipe {r.name}: {r.changes[f.name]}" for r in others
                          if f.name in r.changes and r.changes[f.name] != getattr(base, f.name))
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{m['help']} (default: {default}{recipes})")
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=_TYPES[f.type], choices=m["choices"], nargs=(nargs or {}).get(f.name),
                          metavar=None if m["choices"] else _METAVARS.get(f.type, "VALUE"))
        group.add_argument(flag_name(f), **kwargs)
    if command in RECIPES:
        parser.add_argument("--recipe", default=None, choices=tuple(RECIPES[command]),
                            help="a named preset of these settings (cifarjax.recipes); flags override it "
                                 "(default: original)")


def given(args: argparse.Namespace, command: str) -> dict:
    """The Config values the user typed (field name -> value)."""
    return {f.name: getattr(args, f.name) for f in fields_for(command) if hasattr(args, f.name)}


def new_config(command: str, recipe: Optional[str], typed: dict, **fixed) -> Config:
    """Config's defaults, then the recipe (default 'original'), then the typed flags, then `fixed`; validated."""
    return recipe_config(command, recipe or "original", **typed, **fixed).validate()


def rate_depends_on_length(config) -> bool:
    """Whether the rate at a step depends on the epoch count (all but 'constant'): if not, a shorter run is a prefix."""
    return config.schedule != "constant"


def resumed_config(saved: Config, typed: dict, recipe: Optional[str], where: str) -> Config:
    """The run's own config with the `typed` values a user may change on resume; any other difference is refused."""
    allowed = {f.name: f for f in dataclasses.fields(Config) if f.metadata["resumable"]}
    differing = {k: v for k, v in typed.items() if getattr(saved, k) != v and k not in allowed}
    if recipe is not None and recipe != saved.recipe:
        differing["recipe"] = recipe
    if typed.get("n_epochs", saved.n_epochs) != saved.n_epochs and rate_depends_on_length(saved):
        raise UserError(f"--epochs {typed['n_epochs']} on resume: the run in {where} has a {saved.schedule} "
                        f"learning-rate schedule over its {saved.n_epochs} epochs, which another length would "
                        f"stretch under the steps it already trained; resume with --epochs {saved.n_epochs} (or "
                        "without --epochs), or start a new run with another --out")
    if differing:
        details = ", ".join(f"{k}: {getattr(saved, k)!r} → {v!r}" for k, v in differing.items())
        may = ", ".join(map(flag_name, allowed.values()))
        raise UserError(f"--resume with settings that differ from the run in {where} ({details}); on resume only "
                        f"{may} may change: drop the others, or start a new run with another --out")
    return saved.replace(**{k: v for k, v in typed.items() if k in allowed}).validate()
