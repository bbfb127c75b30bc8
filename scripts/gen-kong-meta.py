#!/usr/bin/env python3
"""Writes deploy/kong/farebox.meta.json from schema/farebox.schema.json.

Kong reads `<filter>.meta.json` next to `<filter>.wasm` in `wasm_filters_path`, and
validates filter configs against its `config_schema` (JSON Schema draft 4 only). The
plugin schema uses only keywords that mean the same in draft 4, so the metadata carries it
unchanged except for `$schema` (draft 4) and `$id` (draft 4 spells it `id`; dropped).

  python3 scripts/gen-kong-meta.py           # rewrite the file
  python3 scripts/gen-kong-meta.py --check   # exit 1 if the file is stale

tests/config_schema.rs performs the same check (`make test`).
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schema" / "farebox.schema.json"
META = ROOT / "deploy" / "kong" / "farebox.meta.json"
DRAFT4 = "http://json-schema.org/draft-04/schema#"


def kong_schema(schema):
    out = {"$schema": DRAFT4}
    out.update({k: v for k, v in schema.items() if k not in ("$schema", "$id")})
    return out


def render():
    schema = json.loads(SCHEMA.read_text())
    return json.dumps({"config_schema": kong_schema(schema)}, indent=2) + "\n"


def main():
    text = render()
    if "--check" in sys.argv[1:]:
        current = META.read_text() if META.exists() else ""
        if json.loads(current or "null") != json.loads(text):
            print(f"{META.relative_to(ROOT)} is stale: run `make kong-meta`", file=sys.stderr)
            return 1
        print(f"{META.relative_to(ROOT)} matches {SCHEMA.relative_to(ROOT)}")
        return 0
    META.write_text(text)
    print(f"wrote {META.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
