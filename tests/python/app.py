"""A small FastAPI app the WORKER_COMMAND tests and benchmarks run under uvicorn and gunicorn.

Every answer says which copy gave it (TANDEM_WORKER_ID) so the tests can see
how requests spread; /infer runs an ONNX model with onnxruntime when
APP_MODEL names one (the benchmark's inference server).
"""

import asyncio
import os

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI()
WORKER = os.environ.get("TANDEM_WORKER_ID", "?")

_session = None
if os.environ.get("APP_MODEL"):
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("APP_THREADS", "1"))
    _session = ort.InferenceSession(os.environ["APP_MODEL"], opts, providers=["CPUExecutionProvider"])
    _input = _session.get_inputs()[0]


@app.get("/")
async def root():
    return {"ok": True, "worker": WORKER}


@app.get("/whoami")
async def whoami(request: Request):
    hidden = sorted(k for k in os.environ if k.startswith(("SSL_", "ACME_", "TANDEM_WORKER_SETTINGS", "LISTEN_")))
    return {
        "worker": WORKER,
        "pid": os.getpid(),
        "headers": {k: v for k, v in request.headers.items()},
        "client": request.client.host if request.client else None,
        "tandem_env": {k: os.environ.get(k) for k in ("TANDEM_WORKER_ID", "TANDEM_WORKER_PORT", "TANDEM_WORKER_SOCKET", "PORT")},
        "hidden_seen": hidden,
    }


@app.post("/echo")
async def echo(request: Request):
    body = await request.body()
    return JSONResponse({"worker": WORKER, "bytes": len(body)}, headers={"x-worker": WORKER})


@app.get("/slow")
async def slow(secs: float = 2.0):
    await asyncio.sleep(secs)
    return {"worker": WORKER, "slept": secs}


@app.get("/stream")
async def stream(n: int = 5, delay: float = 0.2):
    async def chunks():
        for i in range(n):
            yield f"chunk {i} from {WORKER}\n".encode()
            await asyncio.sleep(delay)

    return StreamingResponse(chunks(), media_type="text/plain")


@app.websocket("/ws")
async def ws(socket: WebSocket):
    await socket.accept()
    while True:
        try:
            text = await socket.receive_text()
        except Exception:
            return
        await socket.send_text(f"{WORKER}:{text}")


@app.post("/infer")
def infer(payload: dict):
    import numpy as np

    data = np.asarray(payload["data"], dtype=np.float32).reshape(payload.get("shape", [1, -1]))
    out = _session.run(None, {_input.name: data})[0]
    return {"worker": WORKER, "output": out.ravel().tolist()}
