"""The browser chat page: static HTML/CSS/JS shipped as package data (`static/`), served at / and /static/.

The page is a plain client of the API (/v1/models, /v1/chat/completions with streaming); it is public, as the
API key guards /v1/ only, and asks for the key when the API answers 401."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"

# The page loads nothing from elsewhere (it works offline) and runs no inline script; images are data: URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_chat_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
