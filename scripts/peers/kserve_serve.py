"""Starts KServe's ModelServer (the `kserve` package, its v2 REST face under
uvicorn) serving ONNX files with onnxruntime, as a KServe user writes a custom
predictor, for the peer benchmark (scripts/bench-perf-analyzer).

FOLDER/NAME/model.onnx is served as model NAME, with FOLDER/NAME/metadata.json
as its v2 metadata (the tensors perf_analyzer reads) and
FOLDER/NAME/triton-config.json answered read-only at
`GET /v2/models/{name}/config`, which perf_analyzer asks for before it
measures and KServe does not serve: a separate route beside KServe's own, no
inference passes through it.

WORKERS serving processes (KServe's `workers`: uvicorn processes spawned by
KServe, each with its own onnxruntime session of one intra-op thread, made
on its first request: a session cannot be handed to a spawned process).
KServe's gRPC server runs in its parent process only, so it is not started:
the comparison is over HTTP, binary tensors both ways.

    kserve_serve.py FOLDER PORT WORKERS
"""

import json
import pathlib
import sys

import kserve
import kserve.model_server
import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi.responses import JSONResponse
from kserve.utils.numpy_codec import from_np_dtype

FOLDER = pathlib.Path(sys.argv[1]).resolve()


class OnnxModel(kserve.Model):
    def __init__(self, name):
        super().__init__(name)
        self.metadata = json.loads((FOLDER / name / "metadata.json").read_text())
        self._session = None

    def load(self):
        self.ready = True
        return self.ready

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def session(self):
        if self._session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(FOLDER / self.name / "model.onnx"), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def get_input_types(self):
        return self.metadata["inputs"]

    def get_output_types(self):
        return self.metadata["outputs"]

    def predict(self, payload: kserve.InferRequest, headers=None) -> kserve.InferResponse:
        session = self.session()
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        wanted = [o.name for o in payload.request_outputs] if payload.request_outputs else [o.name for o in session.get_outputs()]
        outputs = []
        for name, value in zip(wanted, session.run(wanted, feeds)):
            value = np.ascontiguousarray(value)
            outputs.append(kserve.InferOutput(name=name, shape=list(value.shape), datatype=from_np_dtype(value.dtype), data=value))
        return kserve.InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs,
                                    use_binary_outputs=payload.use_binary_outputs,
                                    requested_outputs=payload.request_outputs)


async def model_config(name: str):
    path = FOLDER / name / "triton-config.json"
    if not path.is_file():
        return JSONResponse({"error": f"no configuration for model {name!r}"}, status_code=404)
    return JSONResponse(json.loads(path.read_text()))


class LoopbackConfig(uvicorn.Config):
    """KServe binds every interface; a benchmark listens on loopback only."""

    def __init__(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


uvicorn.Config = LoopbackConfig

# Module level: KServe spawns its serving processes, which import this file
# again as their main module, and each needs the route on its own app.
kserve.model_server.app.add_api_route("/v2/models/{name}/config", model_config, methods=["GET"])

if __name__ == "__main__":
    port, workers = int(sys.argv[2]), int(sys.argv[3])
    models = [OnnxModel(d.name) for d in sorted(FOLDER.iterdir()) if (d / "model.onnx").is_file()]
    for m in models:
        m.load()
    kserve.ModelServer(http_port=port, workers=workers, enable_grpc=False, enable_latency_logging=False).start(models)
