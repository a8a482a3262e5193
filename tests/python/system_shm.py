"""Triton's system shared-memory extension through the stock tritonclient
(HTTP and gRPC) and its own shared-memory utilities: what a client sees when it
registers regions, passes tensors in them, and makes every mistake a client
can make. Prints one JSON object of observations; the Rust test judges them.

    system_shm.py HTTP_ADDR GRPC_ADDR [--ca CA]   (--ca: gRPC over TLS)
"""

import argparse
import json
import os

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

p = argparse.ArgumentParser()
p.add_argument("http")
p.add_argument("grpc")
p.add_argument("--ca")
a = p.parse_args()

http = httpclient.InferenceServerClient(a.http)
if a.ca:
    grpc = grpcclient.InferenceServerClient(a.grpc, ssl=True, root_certificates=a.ca)
else:
    grpc = grpcclient.InferenceServerClient(a.grpc)

tag = f"tandem-test-{os.getpid()}"
x = (np.arange(4 * 64) % 17).astype(np.float32).reshape(4, 64)
plain_in = httpclient.InferInput("pixels", [4, 64], "FP32")
plain_in.set_data_from_numpy(x)
want = http.infer("digits", [plain_in]).as_numpy("probabilities")
OUT_AT = 64
out_bytes = 4 * 10 * 4

handles = []


def region(name, size):
    h = shm.create_shared_memory_region(name, f"/{tag}-{name}", size)
    handles.append(h)
    return h


def error_of(f):
    try:
        f()
    except Exception as e:  # tritonclient raises InferenceServerException
        return str(e)
    return None


in_h = region("in", x.nbytes)
shm.set_shared_memory_region(in_h, [x])
out_h = region("out", OUT_AT + out_bytes + 16)
small_h = region("small", 8)
# A link in /dev/shm to a file outside it, a FIFO: never opened.
link = f"/dev/shm/{tag}-link"
os.symlink("/etc/hostname", link)
fifo = f"/dev/shm/{tag}-fifo"
os.mkfifo(fifo)

seen = {}
for face, client, mod in [("http", http, httpclient), ("grpc", grpc, grpcclient)]:
    r = {}
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("in", f"/{tag}-in", x.nbytes)
    client.register_system_shared_memory("out", f"/{tag}-out", out_bytes, offset=OUT_AT)
    client.register_system_shared_memory("small", f"/{tag}-small", 8)
    status = client.get_system_shared_memory_status(**({"as_json": True} if face == "grpc" else {}))
    if face == "grpc":
        status = list(status.get("regions", {}).values())
    r["status"] = sorted((s["name"], s["key"], int(s.get("offset", 0)), int(s["byte_size"])) for s in status)

    def infer(out_region=None, in_size=x.nbytes, in_offset=0, out_size=out_bytes):
        i = mod.InferInput("pixels", [4, 64], "FP32")
        i.set_shared_memory("in", in_size, offset=in_offset)
        o = mod.InferRequestedOutput("probabilities")
        if out_region:
            o.set_shared_memory(out_region, out_size)
        return client.infer("digits", [i], outputs=[o])

    res = infer("out")
    got = shm.get_contents_as_numpy(out_h, np.float32, [OUT_AT // 4 + 40])[OUT_AT // 4 :].reshape(4, 10)
    r["out_in_region_equal"] = bool(np.allclose(got, want))
    if face == "http":
        out = res.get_output("probabilities")
        r["out_in_region_body_empty"] = "data" not in out and "parameters" not in out
    else:
        r["out_in_region_body_empty"] = list(res.get_response().raw_output_contents) == [b""]
    r["out_in_body_equal"] = bool(np.allclose(infer().as_numpy("probabilities"), want))

    r["errors"] = {
        "duplicate": error_of(lambda: client.register_system_shared_memory("in", f"/{tag}-in", 4)),
        "traversal": error_of(lambda: client.register_system_shared_memory("t", "/../../etc/passwd", 4)),
        "symlink": error_of(lambda: client.register_system_shared_memory("l", f"/{tag}-link", 4)),
        "fifo": error_of(lambda: client.register_system_shared_memory("f", f"/{tag}-fifo", 4)),
        "missing": error_of(lambda: client.register_system_shared_memory("m", f"/{tag}-nothing", 4)),
        "past_object": error_of(lambda: client.register_system_shared_memory("big", f"/{tag}-small", 9)),
        "input_size": error_of(lambda: infer(in_size=x.nbytes - 4)),
        "input_past_region": error_of(lambda: infer(in_offset=8)),
        "output_too_small": error_of(lambda: infer("small", out_size=8)),
        "unknown_region": error_of(lambda: infer("nope")),
    }
    # Unregistered: a request naming it is refused and the object is never written again.
    client.unregister_system_shared_memory("out")
    shm.set_shared_memory_region(out_h, [np.full(OUT_AT + out_bytes + 16, 0xAB, dtype=np.uint8)])
    r["errors"]["unregistered"] = error_of(lambda: infer("out"))
    after = shm.get_contents_as_numpy(out_h, np.uint8, [OUT_AT + out_bytes + 16])
    r["unregistered_untouched"] = bool((after == 0xAB).all())
    client.unregister_system_shared_memory()
    status = client.get_system_shared_memory_status(**({"as_json": True} if face == "grpc" else {}))
    r["status_after"] = list(status.get("regions", {}).values()) if face == "grpc" else status
    seen[face] = r

for h in handles:
    shm.destroy_shared_memory_region(h)
os.unlink(link)
os.unlink(fifo)
print(json.dumps(seen))
