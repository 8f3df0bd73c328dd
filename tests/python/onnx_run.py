"""Runs an ONNX model with onnxruntime (the reference runtime): reads
{"features": [[...]], "observed": [...]} on stdin, prints {"expected": [...], "score": [...]}."""
import json
import sys

import numpy as np
import onnxruntime as ort

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
readings = json.load(sys.stdin)
features = np.asarray(readings["features"], dtype=np.float64)
observed = np.asarray(readings["observed"], dtype=np.float64).reshape(-1, 1)
expected, score = session.run(["expected", "score"], {"features": features, "observed": observed})
json.dump({"expected": expected[:, 0].tolist(), "score": score[:, 0].tolist()}, sys.stdout)
