#!/usr/bin/env python3
"""Serves the ONNX project's own backend test models (shipped in the `onnx`
wheel: models exported from PyTorch modules and operators, hand-built
graphs, each with recorded inputs, and the graphs of nine real image
networks with small weights) through tandem, and checks every one.

Usage:
  onnx_backend_sweep.py make REPOSITORY
      writes a model repository of every model with a recorded input set
  onnx_backend_sweep.py check HOST:PORT REPOSITORY [--other-backend]
      for each model: when onnxruntime in Python loads it, tandem must serve it
      and answer the recorded inputs (binary tensors, with tritonclient over
      HTTP and over gRPC on the same port) as onnxruntime does; when onnxruntime cannot load it, tandem must list it
      UNAVAILABLE with a reason and answer an inference with a JSON error. In
      every case the server must stay up and the others must keep serving.
      With --other-backend (tandem on tract), a model onnxruntime loads may
      also be UNAVAILABLE with a reason; what tandem serves must still match.
      Prints one line per model; exits 1 if any model fails.
"""

import pathlib
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import numpy_helper
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

DATA = pathlib.Path(onnx.__file__).parent / "backend/test/data"
SETS = ("pytorch-converted", "pytorch-operator", "simple")
ort.set_default_logger_severity(4)


def models():
    """(repository name, model.onnx, its first recorded input set) for every model that has one."""
    for group in SETS:
        for d in sorted((DATA / group).iterdir()):
            if (d / "model.onnx").is_file() and (d / "test_data_set_0").is_dir():
                yield d.name.lower(), d / "model.onnx", d / "test_data_set_0"


def make(repo):
    repo.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, model, data in models():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(model, repo / name / "1" / "model.onnx")
        shutil.copytree(data, repo / name / "inputs", dirs_exist_ok=True)
        n += 1
    # The "light" models: the graphs of real networks (ResNet-50, DenseNet-121, Inception v1/v2,
    # ShuffleNet, SqueezeNet, VGG-19, AlexNet, ZFNet-512; some name their input "gpu_0/data_0")
    # with small weights, and no recorded inputs: a seeded random image.
    rng = np.random.default_rng(0)
    for model in sorted((DATA / "light").glob("light_*.onnx")):
        name = model.stem
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(model, repo / name / "1" / "model.onnx")
        (repo / name / "inputs").mkdir(exist_ok=True)
        for i, x in enumerate(fed_inputs(load_graph(model))):
            shape = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
            value = rng.standard_normal(shape).astype(np.float32)
            (repo / name / "inputs" / f"input_{i}.pb").write_bytes(numpy_helper.from_array(value).SerializeToString())
        n += 1
    print(f"made {n} models in {repo}", file=sys.stderr)


def load_graph(model_path):
    return onnx.load(str(model_path), load_external_data=False).graph


def fed_inputs(graph):
    """The graph's inputs a caller feeds (an initializer listed as an input is not one)."""
    init = {i.name for i in graph.initializer}
    return [x for x in graph.input if x.name not in init]


def feeds_of(graph, data):
    """The recorded inputs, by graph input name; None when a recorded input is not a plain
    tensor (a sequence, an optional), which the protocol has no form for."""
    feeds = {}
    for i, name in enumerate(x.name for x in fed_inputs(graph)):
        path = data / f"input_{i}.pb"
        if not path.is_file():
            break
        t = onnx.TensorProto()
        try:
            t.ParseFromString(path.read_bytes())
            feeds[name] = numpy_helper.to_array(t)
        except Exception:
            return None
        if not t.name and not t.dims and not t.raw_data and t.data_type == 0:
            return None
    return feeds


def close(got, want):
    if want.dtype == object or got.dtype == object:
        g = [x.decode() if isinstance(x, bytes) else str(x) for x in got.reshape(-1)]
        w = [x.decode() if isinstance(x, bytes) else str(x) for x in want.reshape(-1)]
        return got.shape == want.shape and g == w, "strings"
    if got.shape != want.shape:
        return False, f"shape {got.shape} != {want.shape}"
    if want.dtype.kind in "biu":
        return bool(np.array_equal(got, want)), "equal"
    if not want.size:
        return True, "empty"
    g, w = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(w)
    diff = np.where(both_nan, 0.0, np.abs(g - w))
    diff = np.where(np.isinf(g) & (g == w), 0.0, diff)
    tol = 1e-4 + 1e-3 * np.abs(w)
    return bool(np.all((diff <= tol) | both_nan)), f"max abs diff {float(np.nanmax(diff)):.3g}"


def recorded(graph, data):
    """The outputs the ONNX project recorded for the inputs (output_N.pb), by graph output name."""
    out = {}
    for i, o in enumerate(graph.output):
        t = onnx.TensorProto()
        t.ParseFromString((data / f"output_{i}.pb").read_bytes())
        out[o.name] = numpy_helper.to_array(t)
    return out


def infer_and_compare(clients, name, feeds, want, failures):
    """Sends `feeds` to model `name` as binary tensors, over HTTP and over gRPC; `want` is the outputs
    by name, or the exception the reference raised (then tandem must answer an error). Returns 1 when
    both passed, else appends to `failures` and returns 0."""
    http, grpc = clients
    passed = 1
    for face, lib, client in (("http", httpclient, http), ("grpc", grpcclient, grpc)):
        kw = {"binary_data": True} if face == "http" else {}
        inputs = []
        for k, v in feeds.items():
            dt = "BYTES" if v.dtype.kind in "OSU" else np_to_triton_dtype(v.dtype)
            i = lib.InferInput(k, list(v.shape), dt)
            i.set_data_from_numpy(v.astype(object) if dt == "BYTES" else v, **kw)
            inputs.append(i)
        outputs = [lib.InferRequestedOutput(o, **kw) for o in want] if isinstance(want, dict) else None
        passed &= answered(client, face, name, inputs, outputs, want, failures)
    return passed


def answered(client, face, name, inputs, outputs, want, failures):
    try:
        r = client.infer(name, inputs, outputs=outputs)
    except InferenceServerException as e:
        if isinstance(want, Exception):
            print(f"ok: {name} over {face} refused as the reference refuses it: {str(e)[:100]}", flush=True)
            return 1
        failures.append(f"{name} over {face}: tandem answered an error the reference does not give: {str(e)[:200]}")
        return 0
    if isinstance(want, Exception):
        failures.append(f"{name} over {face}: tandem answered where the reference fails ({str(want)[:100]})")
        return 0
    bad = []
    for o, w in want.items():
        g = r.as_numpy(o)
        if g is None:
            bad.append(f"{o} missing")
            continue
        good, how = close(g, np.asarray(w))
        if not good:
            bad.append(f"{o}: {how}")
    if bad:
        failures.append(f"{name} over {face}: {'; '.join(bad)}")
        return 0
    print(f"ok: {name} over {face} ({len(want)} outputs match)", flush=True)
    return 1


def check(url, repo, other_backend=False):
    client = httpclient.InferenceServerClient(url, network_timeout=120)
    clients = (client, grpcclient.InferenceServerClient(url))
    index = {m["name"]: m for m in client.get_model_repository_index()}
    failures, served, unavailable, skipped = [], 0, 0, 0
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        name = d.name
        model_path = d / "1" / "model.onnx"
        graph = load_graph(model_path)
        entry = index.get(name)
        if entry is None:
            failures.append(f"{name}: not in the repository index")
            continue
        try:
            session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        except Exception as e:
            # onnxruntime cannot load it: tandem must say so, not crash; another backend may serve
            # it, and then must answer as the outputs the ONNX project recorded.
            if entry.get("state") == "READY" and other_backend:
                feeds = feeds_of(graph, d / "inputs")
                if feeds is None:
                    skipped += 1
                    continue
                served += infer_and_compare(clients, name, feeds, recorded(graph, d / "inputs"), failures)
                continue
            if entry.get("state") == "READY":
                failures.append(f"{name}: onnxruntime refuses it ({str(e)[:80]}) but tandem says READY")
            elif not entry.get("reason"):
                failures.append(f"{name}: UNAVAILABLE without a reason")
            else:
                unavailable += 1
                print(f"ok: {name} unavailable: {entry['reason'][:120]}", flush=True)
            continue
        feeds = feeds_of(graph, d / "inputs")
        if entry.get("state") != "READY" and other_backend and entry.get("reason"):
            unavailable += 1
            print(f"ok: {name} unavailable on this backend: {entry['reason'][:120]}", flush=True)
            continue
        if entry.get("state") != "READY":
            failures.append(f"{name}: onnxruntime loads it but tandem says {entry.get('state')}: {entry.get('reason')}")
            continue
        if feeds is None or len(feeds) != len(session.get_inputs()):
            skipped += 1
            print(f"skip: {name} (recorded inputs are not plain tensors)", flush=True)
            continue
        try:
            want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        except Exception as e:
            want = e
        served += infer_and_compare(clients, name, feeds, want, failures)
    if not client.is_server_live():
        failures.append("server not live after the sweep")
    for f in failures:
        print(f"FAIL: {f}", flush=True)
    print(f"sweep: {served} served and matching, {unavailable} unavailable with a reason, {skipped} skipped, {len(failures)} failed", flush=True)
    return 1 if failures else 0


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(pathlib.Path(sys.argv[2]))
        return 0
    if len(sys.argv) in (4, 5) and sys.argv[1] == "check" and sys.argv[4:] in ([], ["--other-backend"]):
        return check(sys.argv[2], pathlib.Path(sys.argv[3]), other_backend=len(sys.argv) == 5)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
