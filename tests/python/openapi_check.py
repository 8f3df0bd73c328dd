"""Checks real HTTP answers against an OpenAPI 3.1 document (used by tests/tests/openapi.rs).

Usage: openapi_check.py SPEC.json CASES.json

CASES is a JSON list of answers the test received:
  {"method": "get", "path": "/api/v1/devices/{id}", "status": 200,
   "content_type": "application/json", "body_file": "/tmp/.../3.body"}
`path` is the document's path template; a case with `"component": "ErrorBody"` instead of
`method`/`path` checks the body against that schema (answers no operation documents, such as the
fallback 404).

For each answer: its operation must be in the document, document its status and its content type,
and the body must be valid against that response's schema (JSON Schema 2020-12, the dialect of
OpenAPI 3.1; `application/x-ndjson`: every line). On top of validity, objects may carry only
properties the schema declares, unless the schema opens them itself (`additionalProperties`, or
an object schema that declares no properties): an answer with an undocumented property fails.

Prints one line per case and a count; exits 1 when any failed.
"""

import json
import sys

from jsonschema import Draft202012Validator

SPEC = None


def wrap(schema):
    """The schema with the document's components beside it, so `#/components/...` resolves."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    return {**schema, "components": SPEC.get("components", {})}


def validator(schema):
    return Draft202012Validator(wrap(schema))


def resolve(schema):
    while isinstance(schema, dict) and "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"unsupported $ref {ref}")
        node = SPEC
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**node, **rest} if rest else node
    return schema


def branches(schema, instance):
    """The schema and, recursively, the allOf branches and the anyOf/oneOf branches that
    `instance` is valid against: every schema that applies to it."""
    schema = resolve(schema)
    if not isinstance(schema, dict):
        return []
    out = [schema]
    for sub in schema.get("allOf", []):
        out += branches(sub, instance)
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key, []):
            if validator(sub).is_valid(instance):
                out += branches(sub, instance)
    return out


def undeclared(instance, schema, where, problems):
    applying = branches(schema, instance)
    if isinstance(instance, dict):
        props = {}
        extra = []
        open_ = False
        for s in applying:
            for name, sub in s.get("properties", {}).items():
                props.setdefault(name, []).append(sub)
            ap = s.get("additionalProperties")
            if ap is True or (isinstance(ap, dict) and ap):
                open_ = True
            if isinstance(ap, dict) and ap:
                extra.append(ap)
        object_schemas = [s for s in applying if s.get("type") in ("object", ["object", "null"])]
        if not props and (object_schemas or not applying) and not any(
            "additionalProperties" in s for s in applying
        ):
            open_ = True  # a free-form object
        for key, value in instance.items():
            if key in props:
                for sub in props[key]:
                    undeclared(value, sub, f"{where}.{key}", problems)
            elif extra:
                for sub in extra:
                    undeclared(value, sub, f"{where}.{key}", problems)
            elif not open_:
                problems.append(f"{where}: property {key!r} is not in the document")
    elif isinstance(instance, list):
        for s in applying:
            if "items" in s and not isinstance(s["items"], bool):
                for i, item in enumerate(instance):
                    undeclared(item, s["items"], f"{where}[{i}]", problems)


def check_value(value, schema, where):
    problems = [
        f"{where}{'/' if e.absolute_path else ''}{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(schema).iter_errors(value)
    ]
    if not problems:
        undeclared(value, schema, where, problems)
    return problems


def media_type(content, content_type):
    base = content_type.split(";")[0].strip().lower()
    for key, media in content.items():
        if key == content_type or key.split(";")[0].strip().lower() == base:
            return media
    return None


def check(case):
    body = open(case["body_file"], "rb").read()
    if "component" in case:
        schema = {"$ref": f"#/components/schemas/{case['component']}"}
        return check_value(json.loads(body), schema, "body")
    item = SPEC["paths"].get(case["path"])
    if item is None:
        return [f"the path {case['path']} is not in the document"]
    op = item.get(case["method"].lower())
    if op is None:
        return [f"{case['method'].upper()} is not documented for {case['path']}"]
    responses = op.get("responses", {})
    response = responses.get(str(case["status"])) or responses.get("default")
    if response is None:
        return [f"status {case['status']} is not documented (only {', '.join(responses)})"]
    response = resolve(response)
    content = response.get("content", {})
    if not content:
        return [] if not body else ["the document says no body, the answer has one"]
    media = media_type(content, case["content_type"])
    if media is None:
        return [f"content type {case['content_type']!r} is not documented (only {', '.join(content)})"]
    schema = media.get("schema")
    base = case["content_type"].split(";")[0].strip().lower()
    if schema is None:
        return []
    if base == "application/json" or base.endswith("+json"):
        return check_value(json.loads(body), schema, "body")
    if base == "application/x-ndjson":
        problems = []
        lines = body.decode().splitlines()
        if not lines:
            problems.append("no lines")
        for i, line in enumerate(lines):
            problems += check_value(json.loads(line), schema, f"line {i + 1}")
        return problems
    if base.startswith("text/"):
        return check_value(body.decode(), schema, "body")
    return []  # bytes: the content type matched, nothing more to say


def main():
    global SPEC
    SPEC = json.load(open(sys.argv[1]))
    cases = json.load(open(sys.argv[2]))
    passed = failed = 0
    for case in cases:
        what = case.get("component") or f"{case['method'].upper()} {case['path']}"
        what = f"{what} -> {case['status']} {case['content_type']} ({case.get('note', '')})"
        try:
            problems = check(case)
        except Exception as e:  # a crash in the check is a failed case, with its reason
            problems = [f"{type(e).__name__}: {e}"]
        if problems:
            failed += 1
            print(f"FAIL {what}")
            for p in problems[:20]:
                print(f"    {p}")
        else:
            passed += 1
            print(f"ok   {what}")
    print(f"{passed} answers match the document, {failed} do not")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
