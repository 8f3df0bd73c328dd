"""Drives a V2 (Open Inference Protocol) server with Triton's client, over HTTP and gRPC:
reads {"model": NAME, "version": V or "", "features": [[...]], "observed": [...]} on stdin,
prints {"http": {...}, "grpc": {...}} with each protocol's server/model checks and outputs.
An optional third argument is a bearer token sent with every call (the hub's /v2); then
"anonymous" says what the gRPC server answers a call without it."""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http_url, grpc_url = sys.argv[1], sys.argv[2]
token = sys.argv[3] if len(sys.argv) > 3 else None


def auth():
    # A fresh dict per call: tritonclient's HTTP client adds its own headers to the one given.
    return {"authorization": f"Bearer {token}"} if token else None


req = json.load(sys.stdin)
features = np.asarray(req["features"], dtype=np.float64)
observed = np.asarray(req["observed"], dtype=np.float64).reshape(-1, 1)
out = {}

h = httpclient.InferenceServerClient(url=http_url)
inputs = [httpclient.InferInput("features", list(features.shape), "FP64"),
          httpclient.InferInput("observed", list(observed.shape), "FP64")]
# JSON tensors both ways (the binary tensor extension is not served).
inputs[0].set_data_from_numpy(features, binary_data=False)
inputs[1].set_data_from_numpy(observed, binary_data=False)
outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("expected", "score")]
r = h.infer(req["model"], inputs, model_version=req["version"], outputs=outputs, headers=auth())
out["http"] = {
    "live": h.is_server_live(headers=auth()), "ready": h.is_server_ready(headers=auth()),
    "model_ready": h.is_model_ready(req["model"], headers=auth()),
    "versions": h.get_model_metadata(req["model"], headers=auth())["versions"],
    "model_version": r.get_response()["model_version"],
    "expected": r.as_numpy("expected")[:, 0].tolist(), "score": r.as_numpy("score")[:, 0].tolist(),
}

# The client's defaults: the binary tensor data extension both ways.
inputs = [httpclient.InferInput("features", list(features.shape), "FP64"),
          httpclient.InferInput("observed", list(observed.shape), "FP64")]
inputs[0].set_data_from_numpy(features)
inputs[1].set_data_from_numpy(observed)
r = h.infer(req["model"], inputs, model_version=req["version"], headers=auth())
out["http_binary"] = {
    "extensions": h.get_server_metadata(headers=auth())["extensions"],
    "expected": r.as_numpy("expected")[:, 0].tolist(), "score": r.as_numpy("score")[:, 0].tolist(),
}

# Many clients at once, one row each: every answer is that row's, whatever it ran with.
hc = httpclient.InferenceServerClient(url=http_url, concurrency=16)
pending = []
for i in range(64):
    row = i % len(features)
    ins = [httpclient.InferInput("features", [1, features.shape[1]], "FP64"),
           httpclient.InferInput("observed", [1, 1], "FP64")]
    ins[0].set_data_from_numpy(features[row:row + 1])
    ins[1].set_data_from_numpy(observed[row:row + 1])
    pending.append((row, hc.async_infer(req["model"], ins, model_version=req["version"], headers=auth())))
rows = [(row, p.get_result().as_numpy("score")[0, 0].item()) for row, p in pending]
stats = h.get_inference_statistics(req["model"], model_version=req["version"], headers=auth())
out["concurrent"] = {"rows": rows, "stats": stats["model_stats"]}

g = grpcclient.InferenceServerClient(url=grpc_url)
inputs = [grpcclient.InferInput("features", list(features.shape), "FP64"),
          grpcclient.InferInput("observed", list(observed.shape), "FP64")]
inputs[0].set_data_from_numpy(features)
inputs[1].set_data_from_numpy(observed)
r = g.infer(req["model"], inputs, model_version=req["version"], headers=auth())
meta = g.get_model_metadata(req["model"], as_json=True, headers=auth())
out["grpc"] = {
    "live": g.is_server_live(headers=auth()), "ready": g.is_server_ready(headers=auth()),
    "model_ready": g.is_model_ready(req["model"], headers=auth()),
    "versions": meta["versions"],
    "model_version": r.get_response(as_json=True)["model_version"],
    "expected": r.as_numpy("expected")[:, 0].tolist(), "score": r.as_numpy("score")[:, 0].tolist(),
}
# A bad request: the protocol's error, with the server's message.
try:
    bad = [grpcclient.InferInput("featurez", list(features.shape), "FP64"), inputs[1]]
    bad[0].set_data_from_numpy(features)
    g.infer(req["model"], bad, headers=auth())
    out["grpc"]["bad"] = "accepted"
except Exception as e:  # tritonclient raises InferenceServerException
    out["grpc"]["bad"] = str(e)
if token:
    try:
        g.is_server_live()
        out["anonymous"] = "accepted"
    except Exception as e:
        out["anonymous"] = str(e)
json.dump(out, sys.stdout)
