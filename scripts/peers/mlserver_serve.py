"""Starts MLServer (`mlserver start FOLDER`) with the read-only model
configuration that Triton's perf_analyzer asks for before it measures and
MLServer does not serve: `ModelConfig` on its gRPC port and
`GET /v2/models/{name}/config` on its HTTP port, answered from a JSON file per
model: FOLDER/NAME/triton-config.json (Triton's ModelConfig as JSON, for
HTTP) and FOLDER/NAME/triton-config.pb (the ModelConfigResponse message, for
gRPC, made by the caller: Triton's protos cannot be loaded beside MLServer's,
which declare the same `inference` package). Both are separate handlers
beside MLServer's own; no inference passes through them.

    mlserver_serve.py FOLDER
"""

import json
import pathlib
import sys

import grpc
import mlserver.grpc.server as grpc_server
import mlserver.rest.server as rest_server
from fastapi.routing import APIRoute

FOLDER = pathlib.Path(sys.argv[1]).resolve()


def config_of(name):
    path = FOLDER / name / "triton-config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def name_of(request):
    """Field 1 (the model's name) of a ModelConfigRequest, read by hand."""
    if len(request) < 2 or request[0] != 0x0A:
        return ""
    length, i, shift = 0, 1, 0
    while i < len(request):
        b = request[i]
        length |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            break
        shift += 7
    return request[i:i + length].decode("utf-8", "replace")


async def grpc_model_config(request, context):
    """MLServer's gRPC server is grpc.aio's: handlers are coroutines."""
    name = name_of(request)
    path = FOLDER / name / "triton-config.pb"
    if not name or not path.is_file():
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no configuration for model {name!r}")
    return path.read_bytes()


config_handler = grpc.method_handlers_generic_handler(
    "inference.GRPCInferenceService",
    {
        "ModelConfig": grpc.unary_unary_rpc_method_handler(
            grpc_model_config,
            request_deserializer=None,
            response_serializer=None,
        )
    },
)

create_server = grpc_server.GRPCServer._create_server


def with_config(self):
    server = create_server(self)
    server.add_generic_rpc_handlers((config_handler,))
    return server


grpc_server.GRPCServer._create_server = with_config

create_app = rest_server.create_app


def app_with_config(*args, **kwargs):
    app = create_app(*args, **kwargs)

    async def http_model_config(model_name: str):
        from fastapi.responses import JSONResponse
        found = config_of(model_name)
        return JSONResponse(found if found is not None else {"error": f"no configuration for {model_name!r}"},
                            status_code=200 if found is not None else 404)

    app.router.routes.insert(0, APIRoute("/v2/models/{model_name}/config", http_model_config, methods=["GET"]))
    return app


rest_server.create_app = app_with_config

if __name__ == "__main__":
    from mlserver.cli.main import main
    sys.argv = ["mlserver", "start", str(FOLDER)]
    main()
