#!/usr/bin/env python3
"""The stock tritonclient.grpc against tandem's gRPC face (plain h2c): health,
metadata, configuration, an inference compared with the HTTP face's answer
for the same input, and errors as gRPC status codes. Prints one JSON object
of what it saw.

Usage: grpc_client.py HOST:PORT [--header NAME=VALUE] [--http HOST:PORT]
                      [--ca PEM [--key PEM --cert PEM]]
With --header every call carries it, and the script first records how an
inference without it ends ("without"). With --ca the gRPC calls go over TLS
trusting that CA (and with --key/--cert present a client certificate); the
HTTP face compared with is at --http (plain), by default HOST:PORT.
"""

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--header")
    p.add_argument("--http")
    p.add_argument("--ca")
    p.add_argument("--key")
    p.add_argument("--cert")
    a = p.parse_args()
    H = {}
    if a.header:
        k, v = a.header.split("=", 1)
        H[k] = v
    HH = H or None
    if a.ca:
        g = grpcclient.InferenceServerClient(
            a.url, ssl=True, root_certificates=a.ca, private_key=a.key, certificate_chain=a.cert)
    else:
        g = grpcclient.InferenceServerClient(a.url)
    h = httpclient.InferenceServerClient(a.http or a.url)
    pixels = (np.arange(128, dtype=np.float32) % 17).reshape(2, 64)
    gi = grpcclient.InferInput("pixels", [2, 64], "FP32")
    gi.set_data_from_numpy(pixels)
    seen = {}
    if H:
        try:
            g.infer("digits", [gi])
            seen["without"] = "served"
        except InferenceServerException as e:
            seen["without"] = e.status()
            seen["without_message"] = e.message()
    seen.update({
        "live": g.is_server_live(headers=HH),
        "ready": g.is_server_ready(headers=HH),
        "model_ready": g.is_model_ready("digits", headers=HH),
        "server": g.get_server_metadata(headers=HH, as_json=True),
        "metadata": g.get_model_metadata("digits", headers=HH, as_json=True),
        "config_max_batch": g.get_model_config("digits", headers=HH, as_json=True)["config"].get("max_batch_size"),
    })
    hi = httpclient.InferInput("pixels", [2, 64], "FP32")
    hi.set_data_from_numpy(pixels, binary_data=True)
    via_grpc = g.infer("digits", [gi], request_id="r1", headers=HH).as_numpy("probabilities")
    # (The HTTP client adds its own entries to the dict it is given.)
    via_http = h.infer("digits", [hi], headers=dict(H)).as_numpy("probabilities")
    # tritonclient's gzip (request and answer compressed) gives the same answer.
    via_gzip = g.infer("digits", [gi], headers=HH, compression_algorithm="gzip").as_numpy("probabilities")
    seen["same_answer"] = bool(np.array_equal(via_grpc, via_http)) and bool(np.array_equal(via_grpc, via_gzip))
    seen["shape"] = list(via_grpc.shape)
    top = g.infer("digits", [gi], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)], headers=HH)
    seen["classes"] = [x.decode() for x in top.as_numpy("probabilities").reshape(-1)]
    errors = {}
    try:
        g.infer("nope", [gi], headers=HH)
    except InferenceServerException as e:
        errors["unknown_model"] = e.status()
    bad = grpcclient.InferInput("pixels", [2, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 63), dtype=np.float32))
    try:
        g.infer("digits", [bad], headers=HH)
    except InferenceServerException as e:
        errors["bad_shape"] = e.status()
    try:
        # The trace settings call is one tandem does not serve (shared memory it does).
        g.get_trace_settings(headers=HH)
        errors["unimplemented"] = "answered"
    except InferenceServerException as e:
        errors["unimplemented"] = e.status()
    seen["errors"] = errors
    # Tensors whose data does not fit their shape, and an input given twice, made as
    # ModelInferRequest messages by hand (tritonclient's InferInput keeps them consistent):
    # each is refused in the terms of the gRPC message.
    from tritonclient.grpc import service_pb2 as pb

    def message(**kw):
        r = pb.ModelInferRequest(model_name="digits")
        for _ in range(kw.pop("inputs", 1)):
            i = r.inputs.add()
            i.name, i.datatype = "pixels", "FP32"
            i.shape.extend([1, 64])
            if "contents" in kw:
                i.contents.fp32_contents.extend(kw["contents"])
        r.raw_input_contents.extend(kw.get("raw", []))
        try:
            g._client_stub.ModelInfer(r, metadata=list((H or {}).items()))
            return "answered"
        except Exception as e:
            return f"{e.code().name}: {e.details()}"

    def bomb(entries):
        # A ModelInferRequest of `entries` empty inputs (two bytes each), sent as bytes:
        # decoded as written it would take hundreds of bytes per entry.
        call = g._channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            call(b"\x0a\x06digits" + b"\x2a\x00" * entries, metadata=list((H or {}).items()), timeout=60)
            return "answered"
        except Exception as e:
            return f"{e.code().name}: {e.details()}"

    seen["malformed"] = {
        "bomb": bomb(3_000_000),
        "short_raw": message(raw=[bytes(255)]),
        "short_contents": message(contents=[0.5] * 10),
        "twice": message(inputs=2, raw=[bytes(256), bytes(256)]),
    }
    stats = g.get_inference_statistics("digits", headers=HH, as_json=True)["model_stats"][0]
    seen["grpc_stats"] = {"name": stats["name"], "success": int(stats["inference_stats"]["success"]["count"])}
    seen["http_stats_success"] = h.get_inference_statistics("digits", headers=dict(H))["model_stats"][0]["inference_stats"]["success"]["count"]
    seen["index"] = [(m["name"], m.get("state")) for m in g.get_model_repository_index(headers=HH, as_json=True)["models"]]
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
