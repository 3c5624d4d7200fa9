"""A fake OpenAI-compatible server for tests that talk to one (teacher data, eval backends): a handler class of the
test's own behind a threading HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading


def send_json(handler, obj: dict, status: int = 200) -> None:
    """Answer a BaseHTTPRequestHandler request with `obj` as JSON."""
    data = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@contextlib.contextmanager
def fake_server(handler_cls):
    """A threading HTTP server on 127.0.0.1 running `handler_cls`; yields its OpenAI base URL (.../v1)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()
