#!/usr/bin/env python3
"""The stock tritonclient against RESTRICTED_API or API_KEYS_FILE: without
the header a call raises (403 naming the category, or 401 asking for a key),
with `headers=` it works, and a health check needs nothing. Prints one JSON
object of what it saw.

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
    # Health checks (model readiness) are open: no header needed.
    seen["ready"] = client.is_model_ready("digits")
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
