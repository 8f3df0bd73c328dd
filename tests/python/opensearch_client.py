"""An independent Elasticsearch/OpenSearch client (opensearch-py) for the data-platform suite.
Reads one JSON request on stdin and prints one JSON answer:

  {"op": "create_index", "url": U, "index": I, "mappings": {...}}  -> the server's answer
  {"op": "dump", "url": U, "index": PATTERN, "sample_of": DEVICE}
      -> {"count": N (from _count), "docs": [{"_index", "_id", "device_id", "seq"}],
          "mappings": {index: mappings}, "sample": the _source of one of DEVICE's documents}
"""
import json
import sys

from opensearchpy import OpenSearch, helpers

req = json.load(sys.stdin)
client = OpenSearch(req["url"], timeout=30)

if req["op"] == "create_index":
    print(json.dumps(client.indices.create(index=req["index"], body={"mappings": req["mappings"]})))
elif req["op"] == "dump":
    pattern = req["index"]
    client.indices.refresh(index=pattern)
    count = client.count(index=pattern)["count"]
    docs = []
    sample = None
    for hit in helpers.scan(client, index=pattern, query={"query": {"match_all": {}}}, size=1000):
        src = hit["_source"]
        if src.get("device_id") == req.get("sample_of"):
            sample = sample or src
        docs.append({"_index": hit["_index"], "_id": hit["_id"],
                     "device_id": src.get("device_id"), "seq": src.get("seq")})
    mappings = {k: v["mappings"] for k, v in client.indices.get_mapping(index=pattern).items()}
    print(json.dumps({"count": count, "docs": docs, "mappings": mappings, "sample": sample}))
else:
    sys.exit(f"unknown op {req['op']}")
