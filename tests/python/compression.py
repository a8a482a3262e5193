#!/usr/bin/env python3
"""tritonclient's request and response compression against a running tandem.

Usage: compression.py HOST:PORT [--ca CA.pem]

For gzip and deflate, with JSON and with binary tensors, classifies a batch of
held-out digits with the request body compressed and the response compressed
on request, and checks the answers equal the uncompressed ones. Prints one line
per case and "compression passed" at the end; exits 1 on the first failure.
"""

import argparse
import pathlib
import sys

import numpy as np
import tritonclient.http as httpclient

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from train_digits import held_out  # noqa: E402


def infer(client, x, binary, algo):
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    r = client.infer("digits", [inp], outputs=[out], request_compression_algorithm=algo, response_compression_algorithm=algo)
    return r.as_numpy("probabilities")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--ca")
    a = ap.parse_args()
    if a.ca:
        client = httpclient.InferenceServerClient(a.url, ssl=True, ssl_options={"ca_certs": a.ca})
    else:
        client = httpclient.InferenceServerClient(a.url)
    _, x_test, _, _ = held_out()
    x = np.ascontiguousarray(x_test[:64], dtype=np.float32)
    for binary in (False, True):
        plain = infer(client, x, binary, None)
        for algo in ("gzip", "deflate"):
            got = infer(client, x, binary, algo)
            ok = got.shape == plain.shape and np.array_equal(got, plain)
            print(f"{'ok' if ok else 'FAIL'}: {algo} binary={binary}", flush=True)
            if not ok:
                sys.exit(1)
    print("compression passed")


if __name__ == "__main__":
    main()
