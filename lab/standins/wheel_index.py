"""A stand-in package index for rigs that cannot reach pypi.org: the wheels of one folder,
served as a PEP 503 "simple" index.

- ``GET /simple/<project>/``: an HTML page with one link per wheel of that project (the
  project name normalized as PEP 503 says: lower case, runs of ``-_.`` as ``-``), each link
  ``../../files/<file>#sha256=<hex>``, as PyPI's pages link to its file host;
- ``GET /files/<file>``: the wheel's bytes.

``WheelIndex(folder, bind=...)`` is a context manager; ``url`` is the ``simple`` URL to give
to the ``cuda_wheel_index`` setting (or to ``pip --index-url``); ``requests`` lists the paths
asked, in order.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class WheelIndex:
    def __init__(self, folder: Path, bind: str = "127.0.0.1", port: int = 0):
        self.folder = Path(folder)
        self.bind, self.port = bind, port
        self.requests: list[str] = []
        self._sha: dict[str, str] = {}
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}/simple"

    def wheels(self, project: str) -> list[Path]:
        return sorted(p for p in self.folder.glob("*.whl")
                      if normalize(p.name.split("-", 1)[0]) == normalize(project))

    def sha256(self, path: Path) -> str:
        if path.name not in self._sha:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            self._sha[path.name] = digest.hexdigest()
        return self._sha[path.name]

    def __enter__(self) -> WheelIndex:
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = unquote(urlsplit(self.path).path)
                index.requests.append(path)
                page = re.fullmatch(r"/simple/([^/]+)/?", path)
                file = re.fullmatch(r"/files/([^/]+\.whl)", path)
                if page:
                    links = "".join(
                        f'<a href="../../files/{quote(w.name)}#sha256={index.sha256(w)}">'
                        f"{w.name}</a>\n" for w in index.wheels(page.group(1)))
                    if not links:
                        return self.send_error(404)
                    body = f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif file and (index.folder / file.group(1)).is_file():
                    target = index.folder / file.group(1)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(target.stat().st_size))
                    self.end_headers()
                    with target.open("rb") as f:
                        while chunk := f.read(1 << 20):
                            self.wfile.write(chunk)
                else:
                    self.send_error(404)

        self._server = ThreadingHTTPServer((self.bind, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
