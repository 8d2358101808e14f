"""The OpenAI chat-completions protocol as this server speaks it: request schema, server settings, errors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800") that no UTF-8 text can hold: the client's error, not ours."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate (invalid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class ImageURL(BaseModel):
    url: Text
    detail: Text | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what a torch.Generator takes
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): always generate max_tokens


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_tokens_default: int = 256
    max_images: int = 8  # per request
    max_tiles: int | None = None  # tiles per image (None: the checkpoint's max_dynamic_patch)
    max_total_tiles: int = 32  # per request, all images
    max_pixels: int = 32_000_000  # per decoded image (decompression bombs)
    allowed_media_dir: Path | None = None  # local image paths are read only below this folder
    request_timeout: float = 300.0
    max_body_bytes: int = 64 * 2**20  # a larger request body is refused (413), chunked bodies too
    body_timeout: float = 30.0  # seconds without request body data before a 408
    raw_special_tokens: bool = False  # True: control tokens typed in messages are tokens (role injection!)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_response(status: int, message: str, code=None, param=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
