#!/usr/bin/env python3
"""The stock tritonclient against RESTRICTED_API: without the header a
restricted call raises (403 naming the category), with `headers=` it works,
and an open category needs nothing. Prints one JSON object of what it saw.

Usage: restricted_api.py HOST:PORT --header NAME --key VALUE (plain HTTP)
"""

import argparse
import json

import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--header", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args()
    client = httpclient.InferenceServerClient(a.url)
    seen = {}
    try:
        client.get_model_repository_index()
        seen["without"] = "allowed"
    except InferenceServerException as e:
        seen["without"] = str(e)
    index = client.get_model_repository_index(headers={a.header: a.key})
    seen["with"] = sorted(m["name"] for m in index)
    # Inference is not restricted here: no header needed.
    seen["ready"] = client.is_model_ready("digits")
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
