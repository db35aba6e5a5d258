"""Images named in a request, as bytes, within the server's limits: ``data:`` URIs always; local files
only under an allowed directory; remote http(s) URLs only when allowed, never to loopback, private
or link-local addresses, with size and time limits; and never more pixels than allowed, read from the
image's header before anything decodes it (a 20 KB PNG can hold 144 million pixels)."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from llava_gguf.image.load import DECODE_ERRORS
from llava_gguf.server.protocol import RequestError


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 << 20
    max_images: int = 8
    allow_remote: bool = False
    allowed_dirs: tuple[Path, ...] = ()
    remote_timeout_s: float = 10.0
    max_pixels: int = 100_000_000  # width * height, from the header; decoding costs ~3 bytes a pixel and more


def image_bytes(url: str, policy: ImagePolicy) -> bytes:
    """The bytes an ``image_url`` names, or a 400 ``RequestError`` saying why not."""
    data = _fetch(url, policy)
    _check_pixels(data, policy)
    return data


def _check_pixels(data: bytes, policy: ImagePolicy) -> None:
    """Refuse an image whose header declares more than ``policy.max_pixels`` pixels; ``Image.open`` reads only
    the header. Data that is no image passes: the decoder says what is wrong with it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as e:  # over twice Pillow's MAX_IMAGE_PIXELS: refused at the header
        raise RequestError(400, f"image is too large to decode safely ({e}); the server's limit is "
                                f"{policy.max_pixels} pixels (--max-image-pixels)", param="image_url") from e
    except (UnidentifiedImageError, *DECODE_ERRORS):
        return
    if width * height > policy.max_pixels:
        raise RequestError(400, f"image is {width}x{height} ({width * height} pixels), over the server's limit of "
                                f"{policy.max_pixels} pixels (--max-image-pixels); downscale it first",
                           param="image_url")


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    if url.startswith("data:"):
        return _data_uri(url, policy)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise RequestError(400, "remote image URLs are off; send the image as a data: URI (or start the server "
                                    "with --allow-remote-images)", param="image_url")
        return _remote(url, policy)
    if scheme in ("", "file"):
        return _local(urllib.parse.urlsplit(url).path if scheme == "file" else url, policy)
    raise RequestError(400, f"unsupported image URL scheme {scheme!r}; send a data: URI", param="image_url")


def _data_uri(url: str, policy: ImagePolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or ";base64" not in header:
        raise RequestError(400, "image data URI must be data:image/...;base64,<data>", param="image_url")
    media = header[len("data:"):].split(";")[0].lower()
    if media and not media.startswith("image/"):
        raise RequestError(400, f"data URI holds {media!r}, not an image", param="image_url")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise RequestError(400, f"image is larger than the server's limit of {policy.max_bytes} bytes",
                           param="image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image data URI is not valid base64 ({e})", param="image_url") from e


def _local(path: str, policy: ImagePolicy) -> bytes:
    if not policy.allowed_dirs:
        raise RequestError(400, "local image paths are off; send the image as a data: URI (or start the server "
                                "with --allowed-dir DIR)", param="image_url")
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(d.resolve()) for d in policy.allowed_dirs):
        raise RequestError(400, f"{path}: outside the directories the server may read", param="image_url")
    try:
        if resolved.stat().st_size > policy.max_bytes:
            raise RequestError(400, f"{path}: larger than the server's limit of {policy.max_bytes} bytes")
        return resolved.read_bytes()
    except OSError as e:
        raise RequestError(400, f"{path}: cannot read ({e.strerror})", param="image_url") from e


def _public(host: str) -> None:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as e:
        raise RequestError(400, f"image host {host!r} does not resolve", param="image_url") from e
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise RequestError(400, f"image host {host!r} is a local or private address; not fetched",
                               param="image_url")


def _remote(url: str, policy: ImagePolicy) -> bytes:
    host = urllib.parse.urlsplit(url).hostname or ""
    _public(host)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:  # a redirect could point inside
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=policy.remote_timeout_s) as response:
            data = response.read(policy.max_bytes + 1)
    except OSError as e:
        raise RequestError(400, f"could not fetch the image ({e})", param="image_url") from e
    if len(data) > policy.max_bytes:
        raise RequestError(400, f"image is larger than the server's limit of {policy.max_bytes} bytes",
                           param="image_url")
    return data
