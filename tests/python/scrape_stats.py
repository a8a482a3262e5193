#!/usr/bin/env python3
"""Reads tandem's /metrics with the Prometheus Python client and its statistics
with the stock tritonclient, and prints both as one JSON object.

Usage: scrape_stats.py HOST:PORT [--ca CA.pem] [--model digits]

`metrics` maps each sample as `name{k="v",...}` (labels sorted) to its value;
the parser refuses anything that is not valid text format 0.0.4. Histograms are
checked here: buckets never decrease and `+Inf` equals `_count`. `triton` holds
get_inference_statistics() for every model, for --model, and for its version 1.
"""

import argparse
import json
import ssl
import sys
import urllib.request

import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--ca")
    ap.add_argument("--model", default="digits")
    a = ap.parse_args()
    scheme = "https" if a.ca else "http"
    ctx = ssl.create_default_context(cafile=a.ca) if a.ca else None
    with urllib.request.urlopen(f"{scheme}://{a.url}/metrics", context=ctx, timeout=10) as r:
        content_type = r.headers["content-type"]
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        buckets = {}
        for s in fam.samples:
            key = s.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}"
            samples[key] = s.value
            if fam.type == "histogram" and s.name.endswith("_bucket"):
                rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                buckets.setdefault(rest, []).append((float(s.labels["le"]), s.value))
        for rest, bs in buckets.items():
            values = [v for _, v in sorted(bs)]
            if values != sorted(values):
                sys.exit(f"{fam.name}{rest}: buckets decrease: {bs}")
            count_key = fam.name + "_count{" + ",".join(f'{k}="{v}"' for k, v in rest) + "}"
            if samples.get(count_key) != values[-1]:
                sys.exit(f"{fam.name}{rest}: +Inf bucket {values[-1]} != _count {samples.get(count_key)}")
    if a.ca:
        client = httpclient.InferenceServerClient(a.url, ssl=True, ssl_options={"ca_certs": a.ca})
    else:
        client = httpclient.InferenceServerClient(a.url)
    triton = {
        "all": client.get_inference_statistics(),
        "model": client.get_inference_statistics(model_name=a.model),
        "version": client.get_inference_statistics(model_name=a.model, model_version="1"),
    }
    print(json.dumps({"content_type": content_type, "metrics": samples, "triton": triton}))


if __name__ == "__main__":
    main()
