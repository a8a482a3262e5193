#!/usr/bin/env python3
"""Hostile gRPC calls from a raw HTTP/2 client (the h2 library, no gRPC
stack), each on its own connection, against tandem's plain port (h2c) or its
HTTPS port (TLS, ALPN h2). Prints one JSON object: for each scenario the
gRPC status the call ended with (or what happened to the connection).

Usage: h2_hostile.py HOST PORT [CA]

Scenarios:
  bad_protobuf   ModelInfer whose message is not a protobuf message
  short_body     a prefix that promises 1000 bytes, then 10 and the end
  huge_prefix    a prefix of 4 GiB - 1 (over MAX_REQUEST_BYTES), no body
  bad_flag       a compressed flag of 7
  many_streams   2000 streams opened at once, past the server's limit
  unread_stream  ModelStreamInfer: requests sent, answers never read; a
                 second connection's call is timed meanwhile
"""

import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

HOST, PORT = sys.argv[1], int(sys.argv[2])
CA = sys.argv[3] if len(sys.argv) > 3 else None
SERVICE = "/inference.GRPCInferenceService/"


def connect():
    sock = socket.create_connection((HOST, PORT), timeout=10)
    if CA:
        ctx = ssl.create_default_context(cafile=CA)
        ctx.set_alpn_protocols(["h2"])
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
        assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def headers(method):
    return [
        (":method", "POST"),
        (":scheme", "https" if CA else "http"),
        (":authority", f"{HOST}:{PORT}"),
        (":path", SERVICE + method),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def frame(payload, flag=0, length=None):
    n = len(payload) if length is None else length
    return bytes([flag]) + n.to_bytes(4, "big") + payload


def pump(sock, conn, until, seconds=10, read_data=True):
    """Reads events until until(events_so_far) is true or time is up; returns all events."""
    seen = []
    deadline = time.monotonic() + seconds
    while not until(seen) and time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except OSError:
            seen.append("closed")
            break
        if not data:
            seen.append("closed")
            break
        for e in conn.receive_data(data):
            seen.append(e)
            if read_data and isinstance(e, h2.events.DataReceived):
                conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        try:
            sock.sendall(conn.data_to_send())
        except OSError:
            seen.append("closed")
            break
    return seen


def status_of(events, stream_id):
    """The grpc-status a stream ended with (trailers, or trailers-only headers), else how it ended."""
    for e in events:
        if isinstance(e, (h2.events.TrailersReceived, h2.events.ResponseReceived)) and e.stream_id == stream_id:
            h = dict(e.headers)
            if "grpc-status" in h:
                return {"status": int(h["grpc-status"]), "message": h.get("grpc-message", "")}
        if isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id:
            return {"reset": int(e.error_code)}
    if "closed" in events:
        return {"closed": True}
    return {"unfinished": True}


def ended(stream_id):
    def check(events):
        return "closed" in events or any(
            isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == stream_id for e in events
        )
    return check


def one_call(method, body, end=True):
    sock, conn = connect()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers(method))
    conn.send_data(sid, body, end_stream=end)
    sock.sendall(conn.data_to_send())
    events = pump(sock, conn, ended(sid))
    sock.close()
    return status_of(events, sid)


def live_call_seconds():
    started = time.monotonic()
    result = one_call("ServerLive", frame(b""))
    return result, time.monotonic() - started


def digits_request(i):
    # ModelInferRequest{model_name="digits", id=str(i), inputs=[{name pixels, FP32, [1,64]}], raw_input_contents=[256 bytes]}
    def field(tag, wire, payload):
        key = bytes([(tag << 3) | wire])
        if wire == 2:
            return key + varint(len(payload)) + payload
        return key + payload
    tensor = field(1, 2, b"pixels") + field(2, 2, b"FP32") + field(3, 2, varint(1) + varint(64))
    return (field(1, 2, b"digits") + field(3, 2, str(i).encode()) + field(5, 2, tensor)
            + field(7, 2, bytes(256)))


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def many_streams():
    sock, conn = connect()
    pump(sock, conn, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev), seconds=5)
    limit = conn.remote_settings.max_concurrent_streams
    # Ignore the server's limit (h2 would refuse to open more), and open 2000 streams at once.
    counted = h2.connection.H2Connection.open_outbound_streams
    h2.connection.H2Connection.open_outbound_streams = property(lambda self: 0)
    opened = 0
    try:
        for _ in range(2000):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers("ServerLive"))
            conn.send_data(sid, frame(b""), end_stream=True)
            opened += 1
        sock.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError) as e:
        return {"limit": limit, "opened": opened, "error": str(e)}
    finally:
        h2.connection.H2Connection.open_outbound_streams = counted
    events = pump(sock, conn, lambda ev: "closed" in ev or sum(
        isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in ev) >= 2000, seconds=20)
    sock.close()
    return {
        "limit": limit,
        "opened": opened,
        "answered": sum(isinstance(e, h2.events.StreamEnded) for e in events),
        "refused": sum(isinstance(e, h2.events.StreamReset) for e in events),
        "goaway": any(isinstance(e, h2.events.ConnectionTerminated) for e in events),
    }


def unread_stream():
    sock, conn = connect()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers("ModelStreamInfer"))
    sent = 0
    # As many requests as flow control lets through; the answers are never read.
    try:
        for i in range(2000):
            msg = frame(digits_request(i))
            if conn.local_flow_control_window(sid) < len(msg):
                break
            conn.send_data(sid, msg)
            sent += 1
            sock.sendall(conn.data_to_send())
    except OSError as e:
        return {"sent": sent, "error": str(e)}
    time.sleep(2)
    other, seconds = live_call_seconds()
    sock.close()
    return {"sent": sent, "other_call": other, "other_seconds": seconds}


def main():
    seen = {}
    seen["bad_protobuf"] = one_call("ModelInfer", frame(b"\xff\xff\xff\xff not protobuf"))
    seen["short_body"] = one_call("ModelInfer", frame(b"0123456789", length=1000))
    seen["huge_prefix"] = one_call("ModelInfer", frame(b"", length=(1 << 32) - 1))
    seen["bad_flag"] = one_call("ModelInfer", frame(b"", flag=7))
    seen["stream_short_body"] = one_call("ModelStreamInfer", frame(digits_request(1)) + frame(b"01", length=50))
    seen["many_streams"] = many_streams()
    seen["unread_stream"] = unread_stream()
    seen["after"] = live_call_seconds()[0]
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
