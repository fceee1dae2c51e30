"""A real HTTP server on 127.0.0.1 for tests of clients that read a status page (`peer --join URL`, doctor)."""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = Callable[[str, int], tuple[int, bytes]]  # (path, how many requests came before) -> (status, JSON body)


@contextmanager
def local_page(answer: Answer) -> Iterator[str]:
    """Serve GET requests with `answer` until the block ends; yields the server's base URL."""
    requests = 0

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            nonlocal requests
            code, body = answer(self.path, requests)
            requests += 1
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
