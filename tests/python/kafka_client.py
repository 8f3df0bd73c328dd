"""An independent Kafka client (kafka-python) for the data-platform suite. Reads one JSON
request on stdin and prints one JSON answer:

  {"op": "create", "brokers": B, "topic": T, "partitions": N}
      -> {"created": T}
  {"op": "read", "brokers": B, "topic": T, "idle_ms": MS}
      -> {"messages": [{partition, offset, key, headers: {..}, seq, json, partition_ok}]}
     every message from the start of every partition; `seq` is field 1 of a protobuf
     shoal.v1.Sample (read from the wire format by hand: no code generated from Shoal's
     protos), `json` the parsed value of a JSON message, `partition_ok` whether the message sits
     in the partition Kafka's default partitioner gives its key (murmur2, as in kafka-python).
"""
import json
import sys

from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.partitioner.default import murmur2

req = json.load(sys.stdin)


def varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def sample_seq(value):
    """Field 1 (varint) of a protobuf message, if it comes first (prost writes fields in order)."""
    if not value or value[0] != 0x08:
        return None
    return varint(value, 1)[0]


if req["op"] == "create":
    admin = KafkaAdminClient(bootstrap_servers=req["brokers"], request_timeout_ms=10000)
    admin.create_topics([NewTopic(req["topic"], req["partitions"], 1)])
    admin.close()
    print(json.dumps({"created": req["topic"]}))
elif req["op"] == "read":
    consumer = KafkaConsumer(
        req["topic"],
        bootstrap_servers=req["brokers"],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=req.get("idle_ms", 3000),
    )
    partitions = None
    out = []
    for m in consumer:
        if partitions is None:
            partitions = len(consumer.partitions_for_topic(req["topic"]))
        headers = {k: v.decode() for k, v in m.headers}
        entry = {
            "partition": m.partition,
            "offset": m.offset,
            "key": m.key.decode(),
            "headers": headers,
            "partition_ok": (murmur2(m.key) & 0x7FFFFFFF) % partitions == m.partition,
        }
        if headers.get("content-type", "").startswith("application/json"):
            entry["json"] = json.loads(m.value)
        elif headers.get("shoal.kind") == "sample":
            entry["seq"] = sample_seq(m.value)
        out.append(entry)
    consumer.close()
    print(json.dumps({"messages": out}))
else:
    sys.exit(f"unknown op {req['op']}")
