"""Validates Kubernetes objects against a CustomResourceDefinition's openAPIV3Schema, the way
an API server with strict field validation does: reads {"crd": PATH (.yaml or .yaml.gz),
"objects": [...]} on stdin and prints {"errors": [[...], ...]}, one list per object (empty:
valid). Unknown fields are errors (the schema is closed where it lists properties and does not
say x-kubernetes-preserve-unknown-fields)."""
import gzip
import json
import sys

import jsonschema
import yaml

req = json.load(sys.stdin)
path = req["crd"]
opener = gzip.open if path.endswith(".gz") else open
with opener(path, "rt") as f:
    crd = yaml.safe_load(f)


def closed(schema):
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


results = []
for obj in req["objects"]:
    group, version = obj["apiVersion"].split("/")
    errors = []
    if group != crd["spec"]["group"] or obj["kind"] != crd["spec"]["names"]["kind"]:
        errors.append(f"{obj['apiVersion']} {obj['kind']} is not what {path} defines")
    versions = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    if not versions:
        errors.append(f"version {version} is not served by {path}")
    else:
        schema = closed(versions[0]["schema"]["openAPIV3Schema"])
        # metadata is validated by the API server itself, not the CRD.
        schema.setdefault("properties", {})["metadata"] = {"type": "object"}
        validator = jsonschema.Draft7Validator(schema)
        errors += [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                   for e in validator.iter_errors(obj)]
    results.append(errors)
json.dump({"errors": results}, sys.stdout)
