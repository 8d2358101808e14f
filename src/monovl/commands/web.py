"""`monovl web`: the server with its browser chat page on 127.0.0.1 (the shipped tiny model by default), and a
browser opened on the page."""
from __future__ import annotations

import socket
import sys
import threading
import time
import webbrowser

from monovl.commands import add_model_args, number
from monovl.commands.serve import add_server_args, build_server


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), port 0 being a free one: bound before the model loads, so that a busy
    port is an error at once, and the page's address is known before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def _open_when_up(server, url: str, wait: float = 60.0) -> None:
    deadline = time.monotonic() + wait
    while not server.started and time.monotonic() < deadline and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        webbrowser.open(url)


def cmd_web(args) -> int:
    import uvicorn

    from monovl.serve.http import protocol_with_header_timeout

    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    try:
        app, engine, what = build_server(args)
    except BaseException:
        sock.close()
        raise
    print(f"chat page for {what}: {url}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                          http=protocol_with_header_timeout(args.header_timeout)))
    if not args.no_browser:
        threading.Thread(target=_open_when_up, args=(server, url), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser("web", help="the browser chat page on a local server (default: the shipped model)")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=number(int, 0, 65535), default=0,
                   help="port to listen on; 0 (the default) picks a free one")
    s.add_argument("--no-browser", action="store_true", help="print the page's address, do not open a browser")
    add_server_args(s)
    s.set_defaults(func=cmd_web)
