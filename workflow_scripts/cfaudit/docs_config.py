"""docs/configuration.md, written from the JSON schemas so that the reference cannot drift from what is checked.

The schemas in ``cfaudit/schemas/`` are what ``validate_config`` enforces; their ``description``, ``type``,
``default``, ``enum`` and bounds are rendered here as one table per config section. ``tests/test_docs.py`` fails
when the committed page differs from a fresh render. Regenerate with ``make docs`` or, from workflow_scripts/,
``python -m cfaudit.docs_config``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cfaudit.config import SCHEMA, load_schema, resolve_ref

OUTPUT = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
TOP = "config.schema.yaml"

HEADER = """\
# Configuration reference

<!-- Generated from workflow_scripts/cfaudit/schemas/*.schema.yaml by `make docs`
     (python -m cfaudit.docs_config); edit the schemas, not this file. tests/test_docs.py checks it is current. -->

`config.yaml` holds the embedded default (a CPU demo); every key is checked against the JSON schemas in
`workflow_scripts/cfaudit/schemas/` (one file per section), and missing keys get the defaults listed below. An
unknown or ill-typed key stops the run before anything executes, naming it:

```
ConfigError: config key 'dataset.synthetic': Additional properties are not allowed ('n_imgs' was unexpected).
```

Override keys with `--configfile my.yaml` (merged key by key over `config.yaml`; several files merge left to
right). Prefer config files to `--config` for nested keys: Snakemake passes nested `--config` values as strings.
The defaults below are the schemas' (the published or seed settings where a section reproduces a method);
`config.yaml` and `presets/*.yaml` override some of them. Which keys can change a result and which cannot (and so
rerun nothing): [reproducibility.md](reproducibility.md#rerunning-stale-stages).
"""


def _text(value) -> str:
    """One table cell: whitespace collapsed, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _code(value) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def type_of(schema: dict) -> str:
    """`integer or null`, `array of number`, `one of` for enums."""
    if "enum" in schema:
        return "one of"
    kinds = schema.get("type", "")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    words = []
    for kind in kinds:
        if kind == "array" and isinstance(schema.get("items"), dict):
            inner = type_of(schema["items"])
            kind = "array" if inner in ("", "one of") else f"array of {inner}"
        words.append(kind)
    return " or ".join(w for w in words if w)


BOUNDS = (("minimum", "≥ {}"), ("exclusiveMinimum", "> {}"), ("maximum", "≤ {}"), ("exclusiveMaximum", "< {}"),
          ("multipleOf", "multiple of {}"), ("minItems", "at least {} item(s)"), ("maxItems", "at most {} item(s)"),
          ("pattern", "matches `{}`"))


def allowed(schema: dict) -> str:
    """Enum values and bounds of a key (and of its array items)."""
    parts = []
    if "enum" in schema:
        parts.append(", ".join(_code(v) for v in schema["enum"]))
    bounds = dict(schema)
    if "minItems" in bounds and bounds.get("maxItems") == bounds["minItems"]:
        parts.append(f"exactly {bounds.pop('minItems')} items")
        bounds.pop("maxItems")
    parts += [fmt.format(bounds[key]) for key, fmt in BOUNDS if key in bounds]
    if schema.get("uniqueItems"):
        parts.append("no repeats")
    items = schema.get("items")
    if isinstance(items, dict) and items.get("type") != "object":
        inner = allowed(items)
        if inner:
            parts.append(f"each: {inner}")
    return "; ".join(parts)


def _row(key: str, schema: dict) -> str:
    default = _code(schema["default"]) if "default" in schema else ""
    return (f"| `{key}` | {type_of(schema)} | {default} | {_text(allowed(schema))} | "
            f"{_text(schema.get('description', ''))} |")


def rows(prefix: str, schema: dict, root: dict, here: Path, seen: dict | None = None) -> list[str]:
    """Table rows of every key under ``schema`` (dotted from ``prefix``), nested objects flattened.

    A ``$ref`` is followed (its own default and description win over the target's); the keys of a shared
    definition (e.g. resources' ``job``) are listed once, later uses point there. An array of objects lists its
    items' keys as ``key[].name``."""
    out, seen = [], {} if seen is None else seen
    for name, sub in schema.get("properties", {}).items():
        key, ref = f"{prefix}{name}", sub.get("$ref")
        root_, here_ = root, here
        if ref:
            target, root_, here_ = resolve_ref(ref, root, here)
            sub = {**target, **{k: v for k, v in sub.items() if k != "$ref"}}
            if ref in seen and "properties" in sub:
                sub["description"] = f"{sub.get('description', '')} Keys as in `{seen[ref]}`.".strip()
                out.append(_row(key, sub))
                continue
            seen[ref] = key
        out.append(_row(key, sub))
        if "properties" in sub:
            out += rows(f"{key}.", sub, root_, here_, seen)
        items = sub.get("items")
        if isinstance(items, dict) and "properties" in items:
            out += rows(f"{key}[].", items, root_, here_, seen)
    return out


def section(name: str, schema: dict, here: Path) -> str:
    """`## name`, the section's description, and the table of its keys."""
    lines = [f"## `{name}`", "", _text(schema.get("description", "")), "",
             f"Schema: `workflow_scripts/cfaudit/schemas/{here.name}`.", "",
             "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    return "\n".join(lines + rows(f"{name}.", schema, schema, here)) + "\n"


def render(schema_dir: Path | str = SCHEMA.parent) -> str:
    """The whole of docs/configuration.md for the schemas in ``schema_dir`` (a pure function of those files)."""
    here = Path(schema_dir) / TOP
    top = load_schema(here)
    scalars = {k: v for k, v in top["properties"].items() if "$ref" not in v}
    parts = [HEADER, "## Top level", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|",
             *rows("", {"properties": scalars}, top, here), ""]
    for name, sub in top["properties"].items():
        if "$ref" in sub:
            target, _, t_here = resolve_ref(sub["$ref"], top, here)
            parts.append(section(name, target, t_here))
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help="file to write (default: docs/configuration.md)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    text = render(SCHEMA.parent)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
