"""A real HTTP server on 127.0.0.1 for the shard-streaming tests: serves a folder, and cuts the connection
part-way through the first responses for the files it is told to (as a flaky network or a restarted proxy does),
or sends more than the file for those in `pad` (a server that lies: N more bytes, announced or chunked); the soak
(tests/soak.py) has it cut whichever shard is asked for next, once.

    with ShardServer(folder, cut={"shard-000002.tar": 1}, pad={"shard-000004.tar": 4096}) as server:
        server.url      # http://127.0.0.1:PORT
        server.gets     # {"shard-000002.tar": 2, ...} requests per file
"""

import functools
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self):
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        with self.server.lock:
            self.server.gets[name] += 1
            cut = self.server.cut.get(name, 0) > 0
            if cut:
                self.server.cut[name] -= 1
            elif self.server.cut_next and name.endswith(".tar"):  # the next shard asked for, whichever it is
                self.server.cut_next -= 1
                self.server.cut_log.append(name)
                cut = True
        file = Path(self.directory) / self.path.split("?")[0].lstrip("/")
        pad = self.server.pad.get(name, 0)
        if pad and file.is_file():
            data = file.read_bytes() + b"\0" * pad
            self.send_response(200)
            try:  # the reader hangs up once it has what the index records
                if self.server.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
            return None
        if not cut or not file.is_file():
            return super().do_GET()
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        half = data[: len(data) // 2]
        if self.server.chunked:  # no length announced: only the chunk framing shows the cut
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(data):x}\r\n".encode() + half)
        else:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(half)  # then the connection drops
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


class ShardServer:
    def __init__(self, folder, cut: dict | None = None, chunked=False, pad: dict | None = None, host="127.0.0.1"):
        self.server = ThreadingHTTPServer((host, 0), functools.partial(_Handler, directory=str(folder)))
        self.server.gets, self.server.cut, self.server.lock = Counter(), dict(cut or {}), threading.Lock()
        self.server.chunked, self.server.pad = chunked, dict(pad or {})
        self.server.cut_next, self.server.cut_log = 0, []
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def gets(self) -> Counter:
        return self.server.gets

    def cut_the_next_shard(self) -> None:
        """The next shard any reader asks for is cut part-way, once (`cut_log` names it)."""
        with self.server.lock:
            self.server.cut_next += 1

    @property
    def cut_log(self) -> list:
        return self.server.cut_log

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
