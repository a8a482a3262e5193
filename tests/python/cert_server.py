#!/usr/bin/env python3
"""A certificate distribution server for tests: serves DIR over HTTPS.

Answers 503 for everything while DIR/OUTAGE exists, so a test can simulate an
outage without restarting it. Prints the port it listens on (loopback only),
then serves until killed.

Usage: cert_server.py DIR CERT.pem KEY.pem
"""

import functools
import http.server
import os
import ssl
import sys


class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if os.path.exists(os.path.join(self.directory, "OUTAGE")):
            self.send_error(503, "outage")
            return
        super().do_GET()

    def log_message(self, fmt, *args):
        sys.stderr.write("cert_server: " + fmt % args + "\n")


def main():
    directory, cert, key = sys.argv[1:4]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=directory))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
