#!/usr/bin/env python3
"""Compares tandem's answers with onnxruntime in Python on the models of scripts/make_test_models.py.

Usage: compare_models.py HOST:PORT REPOSITORY [--ca CA.pem] [--models a,b,...]

For every model, deterministic inputs go to tandem through the stock
tritonclient (binary tensors and JSON tensors) and to an in-process
onnxruntime session on the same model.onnx; outputs must agree (max absolute
difference within tolerance, labels and strings equal). Prints one line per
check with the difference it measured; exits 1 on the first failure.
"""

import argparse
import pathlib
import re
import sys

import ml_dtypes
import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

TOLERANCE = 1e-4
RNG = np.random.default_rng(11)


def check(name, cond, detail=""):
    print(f"{'ok' if cond else 'FAIL'}: {name} {detail}".rstrip(), flush=True)
    if not cond:
        sys.exit(1)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def iris_like(n):
    from sklearn.datasets import load_iris

    return load_iris().data[:n].astype(np.float32)


def diabetes_like(n):
    from sklearn.datasets import load_diabetes

    return load_diabetes().data[:n].astype(np.float32)


def identity_inputs(n):
    feeds = {}
    for name, dt in [
        ("bool", bool), ("uint8", np.uint8), ("uint16", np.uint16), ("uint32", np.uint32), ("uint64", np.uint64),
        ("int8", np.int8), ("int16", np.int16), ("int32", np.int32), ("int64", np.int64),
    ]:
        info = np.iinfo(dt) if dt is not bool else None
        if info is None:
            feeds["in_bool"] = RNG.integers(0, 2, (n, 3)).astype(bool)
        else:
            feeds[f"in_{name}"] = RNG.integers(info.min, info.max, (n, 3), dtype=dt, endpoint=True)
    feeds["in_fp16"] = rand(n, 3, dtype=np.float16)
    feeds["in_fp32"] = rand(n, 3)
    feeds["in_fp64"] = rand(n, 3, dtype=np.float64) * 1e10
    words = np.array(["tandem", "héllo wörld", "", "ONNX", "x" * 300, "日本"], dtype=object)
    feeds["in_bytes"] = RNG.choice(words, (n, 3))
    return feeds


# Per model: cases of inputs; outputs to ask for (None: all); outputs to skip comparing.
CASES = {
    "detector": [{"images": rand(1, 3, 64, 96)}, {"images": rand(2, 3, 32, 160)}],
    "branchy": [{"x": rand(3, 4), "flag": np.array([True])}, {"x": rand(3, 4), "flag": np.array([False])}],
    "lstm": [{"sequence": rand(100, 2, 8)}, {"sequence": rand(3, 5, 8)}],
    "forest": [{"X": iris_like(150)}],
    "boosting": [{"X": diabetes_like(40)}],
    "scaled_text": [{"X": iris_like(150) * 10.0}],
    "zipmap": [{"X": iris_like(20)}],
    "zipmap_text": [{"X": iris_like(20)}],
    "sequence": [{"x": rand(3, 4)}],
    "external": [{"x": np.arange(64, dtype=np.uint8)}],
    "text": [{"text": np.array([["the cat ran"], ["Dogs in the PARK"], [""], ["héllo wörld, 日本"]], dtype=object)}],
    "half": [{"x": rand(5, 4, dtype=np.float16)}],
    "identity_all": [identity_inputs(4)],
    "bf16": [{"in_bf16": rand(4, 3).astype(ml_dtypes.bfloat16)}],
}

# onnxruntime's Python API takes no BF16 arrays: the reference is the graph's meaning, computed by numpy.
REFERENCE = {
    "bf16": lambda feeds: {"out_bf16": feeds["in_bf16"], "widened": feeds["in_bf16"].astype(np.float32)},
}


CLASS_SCORES = re.compile(r"seq\(map\((int64|string),tensor\(float\)\)\)")


def as_matrix(value):
    """onnxruntime's list of class-to-score dicts as the [rows, classes] matrix tandem answers; anything else as it is."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return np.array([[row[k] for k in sorted(row)] for row in value], dtype=np.float32)
    return value


def compare(model, name, got, want):
    if want.dtype == object or got.dtype == object:
        got_s = [g.decode() if isinstance(g, bytes) else str(g) for g in got.reshape(-1)]
        want_s = [w.decode() if isinstance(w, bytes) else str(w) for w in want.reshape(-1)]
        return got.shape == want.shape and got_s == want_s, "strings equal" if got_s == want_s else f"{got_s[:4]} != {want_s[:4]}"
    if got.shape != want.shape:
        return False, f"shape {got.shape} != {want.shape}"
    if want.dtype.kind in "biu":
        equal = bool(np.array_equal(got, want))
        return equal, "equal" if equal else f"{got.reshape(-1)[:4]} != {want.reshape(-1)[:4]}"
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want.astype(np.float64)))) if want.size else 1.0)
    return diff <= tolerance(want.dtype) * scale, f"max abs diff {diff:.3g}"


def tolerance(dtype):
    """TOLERANCE, or two units in the last place for types coarser than it:
    float16 keeps 10 bits, so two engines whose kernels round differently
    (tract's fp16 Tanh against ONNX Runtime's, on some CPUs) differ by an ulp."""
    return max(TOLERANCE, 2.0 * float(ml_dtypes.finfo(dtype).eps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("repository")
    ap.add_argument("--ca")
    ap.add_argument("--models", default=",".join(CASES))
    args = ap.parse_args()
    repo = pathlib.Path(args.repository)
    if args.ca:
        client = httpclient.InferenceServerClient(args.url, ssl=True, ssl_options={"ca_certs": args.ca})
    else:
        client = httpclient.InferenceServerClient(args.url)

    for model in args.models.split(","):
        try:
            session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        except Exception as e:
            if "locale" not in str(e):
                raise
            # A machine without the locale the model's StringNormalizer names (en_US.UTF-8):
            # onnxruntime cannot run it anywhere here, and tandem must say how to add it.
            entry = next(m for m in client.get_model_repository_index() if m["name"] == model)
            reason = entry.get("reason", "")
            check(f"{model}: unavailable without its locale, saying how to add it",
                  entry.get("state") == "UNAVAILABLE" and "localedef" in reason, str(entry))
            continue
        # Tensors, and sequences of class-to-score maps (ZipMap), which tandem carries as [rows, classes].
        tensor_outputs = [o.name for o in session.get_outputs() if o.type.startswith("tensor") or CLASS_SCORES.match(o.type)]
        meta = client.get_model_metadata(model)
        check(f"{model}: metadata platform", meta["platform"] == "onnxruntime_onnx", meta["platform"])
        for case, feeds in enumerate(CASES[model]):
            if model in REFERENCE:
                want = REFERENCE[model](feeds)
            else:
                want = {n: as_matrix(v) for n, v in zip(tensor_outputs, session.run(tensor_outputs, feeds))}
            for binary in (True, False):
                if not binary and any(v.dtype == ml_dtypes.bfloat16 for v in feeds.values()):
                    continue  # tritonclient sends BF16 only as binary
                inputs = []
                for name, value in feeds.items():
                    inp = httpclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
                    inp.set_data_from_numpy(value, binary_data=binary)
                    inputs.append(inp)
                outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in tensor_outputs]
                result = client.infer(model, inputs, outputs=outputs)
                kind = "binary" if binary else "json"
                for name in tensor_outputs:
                    got = result.as_numpy(name)
                    ok, detail = compare(model, name, got, want[name])
                    check(f"{model}[{case}] {kind} {name}", ok, detail)

    if "zipmap" in args.models.split(","):
        zipmap_checks(client)
    if "sequence" in args.models.split(","):
        unsupported_checks(client)
    client.close()
    print("compare suite passed")


def zipmap_checks(client):
    """ZipMap's sequence of maps is a FP32 [rows, classes] output in the metadata, its columns the classes in order."""
    meta = client.get_model_metadata("zipmap")
    outputs = {o["name"]: o for o in meta["outputs"]}
    check("zipmap: the map output is a FP32 [rows, classes] tensor",
          outputs.get("output_probability", {}).get("datatype") == "FP32" and outputs["output_probability"]["shape"] == [-1, -1], str(meta))
    check("zipmap: nothing is listed as unsupported", not meta.get("unsupported_outputs"), str(meta))


def unsupported_checks(client):
    """A non-tensor output with no tensor form is listed as unsupported; asking for it is a 400 naming it; the rest still works."""
    meta = client.get_model_metadata("sequence")
    unsupported = [o["name"] for o in meta.get("unsupported_outputs", [])]
    check("sequence: the sequence output is listed as unsupported", unsupported == ["parts"], str(meta))
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(rand(2, 4))
    try:
        client.infer("sequence", [inp], outputs=[httpclient.InferRequestedOutput("parts")])
        check("sequence: asking for the sequence output is refused", False, "no error")
    except InferenceServerException as e:
        check("sequence: asking for the sequence output is refused", "parts" in str(e), str(e))


if __name__ == "__main__":
    main()
