#!/usr/bin/env python3
"""The stock Python `tritonclient[http]` against a running tandem.

Usage: tritonclient_suite.py HOST:PORT [--ca CA.pem]   (--ca: use HTTPS trusting CA.pem)

Checks liveness, readiness and metadata, classifies 200 held-out digits with
JSON tensors and again with binary tensors (accuracy >= 0.95), asks for the
classification extension, sends a wrong shape (a 4xx InferenceServerException)
and checks that the server keeps serving. Prints one line per check; exits 1
on the first failure.
"""

import argparse
import pathlib
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from train_digits import held_out  # noqa: E402

MODEL = "digits"


def check(name, cond, detail=""):
    print(f"{'ok' if cond else 'FAIL'}: {name} {detail}".rstrip(), flush=True)
    if not cond:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--ca")
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args()

    if args.ca:
        client = httpclient.InferenceServerClient(args.url, ssl=True, ssl_options={"ca_certs": args.ca}, concurrency=4)
    else:
        client = httpclient.InferenceServerClient(args.url, concurrency=4)

    check("server live", client.is_server_live())
    check("server ready", client.is_server_ready())
    check("model ready", client.is_model_ready(MODEL))
    meta = client.get_model_metadata(MODEL)
    check("metadata input", meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}], str(meta["inputs"]))
    check("metadata output", meta["outputs"][0]["shape"] == [-1, 10], str(meta["outputs"]))
    server = client.get_server_metadata()
    check("server metadata", {"binary_tensor_data", "model_configuration", "system_shared_memory"} <= set(server["extensions"]), str(server))
    config = client.get_model_config(MODEL)
    check("model config", config["name"] == MODEL and config["input"][0]["name"] == "pixels", str(config))

    _, x_test, _, y_test = held_out()
    x = np.ascontiguousarray(x_test[: args.count], dtype=np.float32)
    y = y_test[: args.count]

    for binary in (False, True):
        inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer(MODEL, [inp], outputs=[out], request_id=f"batch-{binary}")
        probs = result.as_numpy("probabilities")
        accuracy = float((probs.argmax(axis=1) == y).mean())
        kind = "binary" if binary else "json"
        check(f"{kind} tensors: shape", probs.shape == (len(x), 10), str(probs.shape))
        check(f"{kind} tensors: accuracy >= 0.95", accuracy >= 0.95, f"{accuracy:.4f} on {len(x)} held-out digits")
        check(f"{kind} tensors: request id echoed", result.get_response()["id"] == f"batch-{binary}")

    # One request per digit, several in flight, as an application would send them.
    pending = []
    for row in x[:32]:
        inp = httpclient.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(row.reshape(1, 64))
        pending.append(client.async_infer(MODEL, [inp]))
    preds = [p.get_result().as_numpy("probabilities").argmax() for p in pending]
    check("single-digit requests", float((np.array(preds) == y[:32]).mean()) >= 0.9)

    inp = httpclient.InferInput("pixels", [2, 64], "FP32")
    inp.set_data_from_numpy(x[:2])
    top = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=3)])
    classes = top.as_numpy("probabilities")
    check("classification extension", classes.shape == (2, 3) and int(classes[0][0].split(b":")[1]) == y[0], str(classes))

    try:
        bad = httpclient.InferInput("pixels", [1, 63], "FP32")
        bad.set_data_from_numpy(x[:1, :63])
        client.infer(MODEL, [bad])
        check("wrong shape refused", False, "no error")
    except InferenceServerException as e:
        status = str(e.status() or "")
        check("wrong shape refused with 4xx", status.startswith("4") or "400" in str(e), f"status={status} {e}")
    try:
        client.infer("no-such-model", [inp])
        check("unknown model refused", False, "no error")
    except InferenceServerException as e:
        check("unknown model refused", "unknown model" in str(e), str(e))

    check("still serving after bad requests", client.is_server_ready() and client.is_model_ready(MODEL))
    result = client.infer(MODEL, [inp])
    check("still inferring after bad requests", result.as_numpy("probabilities").shape == (2, 10))
    client.close()
    print("tritonclient suite passed")


if __name__ == "__main__":
    main()
