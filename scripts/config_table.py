"""Print the README's configuration table from sozud.config (tests/test_readme.py checks they match)."""

from __future__ import annotations

from sozud.config import SETTINGS


def _toml_key(place: str) -> str:
    section, _, name = place.rpartition(".")
    return f"`[{section}] {name}`" if section else f"`{name}`"


def config_table() -> str:
    rows = ["| TOML key | variable, flag | default | meaning |", "|---|---|---|---|"]
    for name, setting in SETTINGS.items():
        default = setting.default
        shown = {"": "(derived)", None: "(unset)"}.get(default, default) if not isinstance(default, bool) else default
        if name == "node":
            shown = "(host name)"
        elif name == "meta_key":
            shown = "`<key>.meta`"
        elif isinstance(shown, str) and not shown.startswith("("):
            shown = f"`{shown}`"
        elif isinstance(shown, bool | int | float):
            shown = f"`{str(shown).lower() if isinstance(shown, bool) else shown}`"
        keys = ", ".join(_toml_key(p) for p in setting.places)
        rows.append(f"| {keys} | `{setting.env}`, `{setting.flag}` | {shown} | {setting.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_table())
