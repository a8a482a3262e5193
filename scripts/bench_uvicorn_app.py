"""The stack tandem replaces, for scripts/bench-models: onnxruntime behind FastAPI/uvicorn.

A minimal Open Inference Protocol JSON endpoint (`POST /v2/models/{name}/infer`,
FP32 inputs), as a team would write it around `onnxruntime.InferenceSession`.
Models come from the Triton repository in BENCH_REPO; sessions use
BENCH_THREADS intra-op threads. Run (from scripts/):
gunicorn -k uvicorn.workers.UvicornWorker -w 2 bench_uvicorn_app:app
"""

import os
import pathlib

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool

app = FastAPI()
SESSIONS = {}


def session(name):
    if name not in SESSIONS:
        path = pathlib.Path(os.environ["BENCH_REPO"]) / name / "1" / "model.onnx"
        if not path.exists():
            raise HTTPException(404, f"unknown model {name}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("BENCH_THREADS", "1"))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        SESSIONS[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return SESSIONS[name]


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    body = await request.json()
    sess = session(name)
    feeds = {i["name"]: np.asarray(i["data"], dtype=np.float32).reshape(i["shape"]) for i in body["inputs"]}
    names = [o.name for o in sess.get_outputs()]
    # Off the event loop, as a careful FastAPI app does, so parsing overlaps inference.
    outputs = await run_in_threadpool(sess.run, names, feeds)
    return {
        "model_name": name,
        "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(v.shape), "data": v.reshape(-1).tolist()}
            for n, v in zip(names, outputs)
        ],
    }
