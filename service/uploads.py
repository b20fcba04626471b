"""Reading a request's input: a raw point-cloud body, a multipart ``file`` part, or multipart RGB-D views.

Raw bodies are streamed into a SpooledTemporaryFile (memory up to 16 MiB, then disk); the size limit is
enforced while the bytes arrive by :class:`service.middleware.BodyLimitMiddleware`. The point-cloud
format comes from ``?format=``, else the Content-Type (``application/vnd.ponder.<fmt>``), else the file
name (multipart filename, ``?filename=`` or Content-Disposition), else the file's magic bytes.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from model.pointcloud.readers import SUPPORTED_FORMATS, compression, format_from_name, guess_format
from service.errors import ApiError

SPOOL_BYTES = 16 << 20
_VND = re.compile(r"^application/vnd\.ponder\.([a-z0-9]+)$")
_CONTENT_TYPES = {
    "application/x-npy": "npy",
    "application/x-npz": "npz",
    "application/vnd.las": "las",
    "application/vnd.laszip": "laz",
    "text/plain": "txt",
}
# Types that say nothing about the format; curl's --data-binary default (form-urlencoded) is one of them.
_NEUTRAL_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")
_FILENAME = re.compile(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', re.IGNORECASE)


@dataclass
class CloudUpload:
    """A point-cloud file: its bytes (or a spooled stream of them), resolved format, a name for messages."""

    source: bytes | BinaryIO
    format: str
    name: str


@dataclass
class RGBDUpload:
    """Multipart RGB-D views: raw image bytes per view id and the cameras JSON."""

    depth: dict[str, bytes]
    color: dict[str, bytes]
    cameras: bytes


def _format_of(param: str | None, content_type: str, name: str | None, head: bytes, strict_type: bool = True) -> str:
    """Resolve the format (415 when it is unknown or cannot be told). ``strict_type``: refuse an unknown
    Content-Type (raw bodies) rather than ignore it (multipart parts, whose types clients guess)."""
    if param:
        fmt = format_from_name(f"upload.{param.lstrip('.')}")  # the readers' names and aliases (xyzrgb)
        if fmt is None:
            raise ApiError(415, f"unknown point-cloud format {param!r}; supported: {', '.join(SUPPORTED_FORMATS)}")
        return fmt
    media = content_type.split(";")[0].strip().lower()
    if (match := _VND.match(media)) is not None:
        if match.group(1) not in SUPPORTED_FORMATS:
            raise ApiError(415, f"unknown point-cloud format {match.group(1)!r} in Content-Type {media!r}; "
                                f"supported: {', '.join(SUPPORTED_FORMATS)}")
        return match.group(1)
    mapped = _CONTENT_TYPES.get(media)
    if strict_type:
        if mapped:
            return mapped
        if media not in _NEUTRAL_TYPES:
            raise ApiError(415, f"unsupported Content-Type {media!r}: send application/vnd.ponder.<format> "
                                f"(format one of {', '.join(SUPPORTED_FORMATS)}), application/octet-stream with "
                                f"?format=, or multipart/form-data with a 'file' part")
    fmt = guess_format((name,), head, hinted=mapped)
    compressed = compression((name,), head, format_known=fmt is not None)
    if compressed:  # ?format= would not help: the readers take uncompressed files
        raise ApiError(415, f"{name or 'the upload'} is {compressed}-compressed; decompress it and send the "
                            "file itself")
    if fmt is None:
        raise ApiError(415, f"cannot tell the point-cloud format of {name or 'the upload'}: pass ?format= "
                            f"(one of {', '.join(SUPPORTED_FORMATS)}), a Content-Type "
                            f"application/vnd.ponder.<format>, or a file name with its suffix")
    return fmt


async def read_raw_body(request: Request, format_param: str | None, filename: str | None) -> CloudUpload:
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        async for chunk in request.stream():
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    size = spool.tell()
    if size == 0:
        spool.close()
        raise ApiError(400, "the request body is empty: send a point-cloud file (raw body or multipart 'file' "
                            "part) or RGB-D views (multipart depth_*/color_*/cameras parts)")
    spool.seek(0)
    head = spool.read(64)
    spool.seek(0)
    disposition = request.headers.get("content-disposition", "")
    match = _FILENAME.search(disposition)
    name = filename or (match.group(1) if match else None)
    fmt = _format_of(format_param, request.headers.get("content-type", ""), name, head)
    return CloudUpload(source=spool, format=fmt, name=name or f"upload.{fmt}")


_OVER_LIMIT = ("too many files", "too many fields", "part exceeded maximum size")


async def parsed_form(request: Request, max_files: int = 128, max_fields: int = 128,
                      max_part_size: int = 4 << 20) -> FormData:
    """The request's multipart form (parsed once; Starlette keeps it on the request for later calls). Over a
    part-count or part-size limit is a 413 and a malformed body a 400, each with the parser's message
    (Starlette turns its parser's errors into 400s, so the message tells which is which)."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
    except (MultiPartException, HTTPException) as exc:
        message = exc.message if isinstance(exc, MultiPartException) else str(exc.detail)
        if isinstance(exc, HTTPException) and exc.status_code != 400:
            raise
        if message.lower().startswith(_OVER_LIMIT):
            raise ApiError(413, f"{message} (here a text field holds at most {max_part_size >> 10} KiB: send large "
                                f"content as a file part; a form has at most {max_files} files and {max_fields} "
                                "fields)") from exc
        raise ApiError(400, f"malformed multipart body: {message}") from exc


async def read_multipart(request: Request, format_param: str | None) -> CloudUpload | RGBDUpload:
    form = await parsed_form(request)
    try:
        parts = dict(form.multi_items())
        if "file" in parts:
            part = parts["file"]
            data = await _part_bytes(part)  # a file upload, or a text field holding the file (XYZ text)
            filename = part.filename if isinstance(part, UploadFile) else None
            if not data:
                raise ApiError(400, f"the uploaded file {filename or 'file'} is empty")
            content_type = (part.content_type or "") if isinstance(part, UploadFile) else ""
            fmt = _format_of(format_param, content_type, filename, data[:64], strict_type=False)
            return CloudUpload(source=data, format=fmt, name=filename or f"upload.{fmt}")
        depth = {k[6:]: await _part_bytes(v) for k, v in parts.items() if k.startswith("depth_")}
        if depth:
            color = {k[6:]: await _part_bytes(v) for k, v in parts.items() if k.startswith("color_")}
            if "cameras" not in parts:
                raise ApiError(400, "RGB-D upload without a 'cameras' part (JSON with intrinsics and poses)")
            cameras = await _part_bytes(parts["cameras"])
            return RGBDUpload(depth=depth, color=color, cameras=cameras)
        names = ", ".join(parts) or "none"
        raise ApiError(400, f"multipart body has no 'file' part and no 'depth_<view>' parts (parts: {names})")
    finally:
        await form.close()


async def _part_bytes(part: UploadFile | str) -> bytes:
    if isinstance(part, UploadFile):
        return await part.read()
    return part.encode()


async def discard_body(request: Request, limit_s: float = 10.0) -> None:
    """Read and drop what is left of the body (bounded in time), so a refusal reaches a client that is still
    sending instead of a reset connection. Nothing is stored or parsed."""
    try:
        async with asyncio.timeout(limit_s):
            async for _ in request.stream():
                pass
    except Exception:  # noqa: BLE001 - consumed already, disconnected, too slow, over the limit: refuse anyway
        pass


async def read_upload(request: Request, format_param: str | None, filename: str | None
                      ) -> CloudUpload | RGBDUpload:
    """The request's input, whatever its shape (raw body or multipart)."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        return await read_multipart(request, format_param)
    return await read_raw_body(request, format_param, filename)
