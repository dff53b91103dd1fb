"""Print the README's configuration table from sozud.config (tests/test_readme.py checks they match)."""

from __future__ import annotations

from sozud.config import FIELD_HELP, Config


def config_table() -> str:
    rows = ["| key (TOML) | default | meaning |", "|---|---|---|"]
    for name, default in zip(Config.__struct_fields__, Config.__struct_defaults__, strict=True):
        shown = {"": "(derived)", None: "(unset)"}.get(default, default) if not isinstance(default, bool) else default
        if name == "node":
            shown = "(host name)"
        elif name == "meta_key":
            shown = "`<key>.meta`"
        elif isinstance(shown, str) and not shown.startswith("("):
            shown = f"`{shown}`"
        elif isinstance(shown, bool | int | float):
            shown = f"`{str(shown).lower() if isinstance(shown, bool) else shown}`"
        rows.append(f"| `{name}` | {shown} | {FIELD_HELP[name]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_table())
