"""An HTTP/3 client for the tests, on aioquic (a QUIC and HTTP/3 stack of its own).

    h3_client.py HOST PORT PLAN_JSON [--ca CA] [--cert CERT --key KEY]
    h3_client.py HOST PORT --flood N [--wait SECONDS]

A plan is a list of steps run in order, each printing one JSON line:
  {"connect": "a"}                          open connection "a" (prints the served certificate's SHA-256
                                            and the largest UDP payload the server accepts);
                                            "max_datagram_size": N sends packets of up to N bytes
  {"request": "a", "method": "GET", "path": "/v2/health/ready",
   "headers": [["k", "v"]], "body_file": "F" | "body": "text"}
                                            one request on "a" (prints status, headers, body, trailers)
  {"wait_file": "PATH"}                     waits until PATH exists (the test changes something meanwhile)
  {"touch": "PATH"}                         creates PATH (tells the test a step was reached)
  {"loop": "PATH", "method": ..., "path": ..., "body": ...}
                                            the request on a new connection each time until PATH
                                            exists (prints how many succeeded, every failure, the slowest)
A step that fails prints {"error": ...} and the plan goes on.

--flood N sends the first Initial packet of N QUIC handshakes from one UDP
socket and never answers; it prints how many of them the server answered
with its own Initial (a handshake it holds state for) and how many with a
Retry (stateless address validation).
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import socket
import ssl
import sys
import time

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic import connection as aioquic_connection
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, StreamReset
from cryptography.hazmat.primitives.serialization import Encoding


# How the last connections ended, for the error a failed connect() gives without a reason.
TERMINATED = []

# The transport parameters each handshake received from the server, in order.
SERVER_PARAMETERS = []
_pull_parameters = aioquic_connection.pull_quic_transport_parameters


def _pull_and_keep(*args, **kwargs):
    params = _pull_parameters(*args, **kwargs)
    SERVER_PARAMETERS.append(params)
    return params


aioquic_connection.pull_quic_transport_parameters = _pull_and_keep


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiting = {}
        self.events = {}

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            TERMINATED.append(f"closed with {event.error_code:#x} {event.reason_phrase!r} (frame {event.frame_type})")
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection closed: {event.error_code} {event.reason_phrase}"))
            self.waiting.clear()
            return
        if isinstance(event, StreamReset):
            fut = self.waiting.pop(event.stream_id, None)
            if fut and not fut.done():
                fut.set_exception(ConnectionError(f"stream reset: {event.error_code}"))
            return
        for e in self.h3.handle_event(event):
            if isinstance(e, (HeadersReceived, DataReceived)):
                self.events.setdefault(e.stream_id, []).append(e)
                if e.stream_ended:
                    fut = self.waiting.pop(e.stream_id, None)
                    if fut and not fut.done():
                        fut.set_result(self.events.pop(e.stream_id))

    async def request(self, authority, method, path, headers, body, timeout=30):
        sid = self._quic.get_next_available_stream_id()
        head = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ] + [(k.lower().encode(), v.encode()) for k, v in headers]
        self.h3.send_headers(sid, head, end_stream=not body)
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[sid] = fut
        self.transmit()
        events = await asyncio.wait_for(fut, timeout)
        status, out_headers, data, trailers = None, {}, b"", {}
        for e in events:
            if isinstance(e, HeadersReceived):
                fields = {k.decode(): v.decode() for k, v in e.headers}
                if status is None:
                    status = int(fields.pop(":status"))
                    out_headers = fields
                else:
                    trailers = fields
            else:
                data += e.data
        return status, out_headers, data, trailers


def served_certificate(client):
    cert = client._quic.tls._peer_certificate
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() if cert else None


def body_text(data):
    try:
        return {"body": data.decode()}
    except UnicodeDecodeError:
        return {"body_b64": base64.b64encode(data).decode()}


def step_body(step):
    if "body_file" in step:
        with open(step["body_file"], "rb") as f:
            return f.read()
    if "body" in step:
        return step["body"].encode()
    return None


async def ask(client, port, step, body):
    return await client.request(f"localhost:{port}", step.get("method", "GET"), step["path"], step.get("headers", []), body)


async def open_connection(host, port, args, max_datagram_size=None):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    if max_datagram_size:
        config.max_datagram_size = max_datagram_size
    config.load_verify_locations(args.ca)
    if args.cert:
        config.load_cert_chain(args.cert, args.key)
    cm = connect(host, port, configuration=config, create_protocol=H3Client, wait_connected=True)
    return cm, await asyncio.wait_for(cm.__aenter__(), 10)


async def loop(host, port, step, args):
    """The request on a new connection each time until the step's file exists."""
    body = step_body(step)
    ok, failed, slowest = 0, [], 0.0
    while not os.path.exists(step["loop"]):
        began = time.time()
        try:
            cm, client = await open_connection(host, port, args)
            try:
                status, _, data, _ = await ask(client, port, step, body)
            finally:
                await asyncio.wait_for(cm.__aexit__(None, None, None), 5)
            if status == 200:
                ok += 1
            else:
                failed.append(f"{status}: {data[:200]!r}")
        except Exception as e:  # noqa: BLE001 - every failure is counted
            why = TERMINATED[-1] if TERMINATED else "no close seen"
            failed.append(f"{type(e).__name__}: {e} after {time.time() - began:.3f}s; {why}")
        slowest = max(slowest, time.time() - began)
    return {"ok": ok, "failed": failed, "slowest_ms": round(slowest * 1000, 1)}


async def run_plan(host, port, plan, args):
    conns = {}
    stacks = []
    for step in plan:
        try:
            if "connect" in step:
                cm, client = await open_connection(host, port, args, step.get("max_datagram_size"))
                stacks.append(cm)
                conns[step["connect"]] = client
                params = SERVER_PARAMETERS[-1] if SERVER_PARAMETERS else None
                print(json.dumps({"connected": step["connect"], "cert_sha256": served_certificate(client),
                                  "max_udp_payload_size": getattr(params, "max_udp_payload_size", None)}), flush=True)
            elif "loop" in step:
                print(json.dumps(await loop(host, port, step, args)), flush=True)
            elif "request" in step:
                status, headers, data, trailers = await ask(conns[step["request"]], port, step, step_body(step))
                out = {"status": status, "headers": headers, "trailers": trailers}
                out.update(body_text(data))
                print(json.dumps(out), flush=True)
            elif "wait_file" in step:
                deadline = time.time() + 60
                while not os.path.exists(step["wait_file"]) and time.time() < deadline:
                    await asyncio.sleep(0.05)
                print(json.dumps({"waited": step["wait_file"]}), flush=True)
            elif "touch" in step:
                open(step["touch"], "w").close()
                print(json.dumps({"touched": step["touch"]}), flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported as a step's result
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    for cm in reversed(stacks):
        try:
            await asyncio.wait_for(cm.__aexit__(None, None, None), 5)
        except Exception:  # noqa: BLE001
            pass


def flood(host, port, n, wait):
    """First Initial packets of n handshakes, never continued; what came back, by kind."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held, retried = set(), set()

    def drain(until):
        # Read as we go: the server's answers would overflow the socket's buffer otherwise.
        while True:
            sock.settimeout(max(until - time.time(), 0) or 0.001)
            try:
                data, _ = sock.recvfrom(65536)
            except (socket.timeout, BlockingIOError):
                if time.time() >= until:
                    return
                continue
            first = data[0]
            if not first & 0x80:
                continue
            kind = (first & 0x30) >> 4
            dcid = data[6 : 6 + data[5]]
            if kind == 3:
                retried.add(dcid)
            elif kind in (0, 2):
                held.add(dcid)

    for _ in range(n):
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE)
        conn = QuicConnection(configuration=config)
        conn.connect((host, port), now=time.time())
        for data, _addr in conn.datagrams_to_send(now=time.time()):
            sock.sendto(data, (host, port))
        drain(time.time() + 0.002)
    drain(time.time() + wait)
    print(json.dumps({"sent": n, "answered_initial": len(held), "answered_retry": len(retried)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("plan", nargs="?")
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--flood", type=int)
    p.add_argument("--wait", type=float, default=2.0)
    args = p.parse_args()
    if args.flood:
        flood(args.host, args.port, args.flood, args.wait)
        return
    asyncio.run(run_plan(args.host, args.port, json.loads(args.plan), args))


if __name__ == "__main__":
    sys.exit(main())
