"""Images in prompts: reading an ``image_url`` safely, and what the engine carries per image.

A chat message's image parts (OpenAI's and Mistral's ``image_url``) arrive as a base64
data URI or, where the operator allows it (``--allow-image-urls``), an http(s) URL.
``load_image`` turns one into a decoded PIL image under ``ImagePolicy``'s limits, or
refuses it with ``InvalidParameter`` naming the part and the problem: bad base64, too
many bytes, an unsupported format, too many pixels (a decompression bomb is refused
from its header, before any pixel is decoded), a truncated file, a URL that is not
allowed, too slow or too big. mistral-common then resizes and tokenizes it
(``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``); the engine gets an ``ImageInput`` per image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidParameter

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

log = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*);base64,", re.ASCII)


@dataclass(frozen=True)
class ImagePolicy:
    """What an image part may be. ``allow_urls``: fetch http(s) URLs (off by default: a
    server must not become a proxy into the network it sits in); ``max_bytes``: the
    encoded image's size; ``max_pixels`` / ``max_side``: its dimensions, read from the
    header before decoding; ``timeout_s``: a URL's whole download; ``max_images``: per
    request."""

    allow_urls: bool = False
    max_bytes: int = 20 << 20
    max_pixels: int = 50_000_000
    max_side: int = 16384
    timeout_s: float = 10.0
    max_images: int = 16


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the SHA-256 of its bytes (what the prefix cache and the
    encoder cache key it by)."""

    image: Image
    digest: str


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One image of a prompt as the engine takes it: ``pixels`` (C, H, W) float32, as
    mistral-common prepared them; ``digest`` of its source; ``offset``: the index in the
    prompt of its first token, ``length``: its tokens (``[IMG]`` rows, ``[IMG_BREAK]``
    between rows, ``[IMG_END]`` last). The encoder's rows replace the ``[IMG]`` tokens
    of that span, in order."""

    pixels: torch.Tensor
    digest: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def rows(self, tokens, img: int) -> list[int]:
        """The positions in ``tokens`` (the prompt) of this image's ``img`` ([IMG]) tokens,
        in order: where the encoder's rows for it go, one each."""
        return [self.offset + j for j, t in enumerate(tokens[self.offset:self.end]) if t == img]


def image_inputs(tokens: list[int], pixels: list, digests: list[str], img: int, img_end: int) -> list[ImageInput]:
    """The ``ImageInput`` of each image of a prompt that mistral-common encoded: its
    pixels (numpy, (C, H, W)) and digest, its span from its first ``[IMG]`` to its
    ``[IMG_END]``, images in order."""
    import torch

    ends = [i for i, t in enumerate(tokens) if t == img_end]
    if not len(ends) == len(pixels) == len(digests):
        raise ValueError(f"{len(digests)} images gave {len(ends)} image spans and {len(pixels)} pixel arrays")
    out, start = [], 0
    for array, digest, end in zip(pixels, digests, ends):
        first = tokens.index(img, start, end)
        out.append(ImageInput(torch.from_numpy(array).float(), digest, first, end + 1 - first))
        start = end + 1
    return out


def load_image(url: object, policy: ImagePolicy, field: str) -> LoadedImage:
    """The image an ``image_url`` names, decoded and checked; ``field`` names the part in
    errors (``messages[0].content[1].image_url``)."""
    if not isinstance(url, str) or not url:
        raise InvalidParameter(field, "must be a data URI (data:image/png;base64,...) or an http(s) URL")
    if url.startswith("data:"):
        data = _decode_data_uri(url, policy, field)
    elif url.startswith(("http://", "https://")):
        if not policy.allow_urls:
            raise InvalidParameter(field, "image URLs are not fetched by this server (start it with "
                                          "--allow-image-urls); send the image inline as a base64 data URI")
        data = _fetch(url, policy, field)
    else:
        scheme = url.split(":", 1)[0][:16] if ":" in url else None
        raise InvalidParameter(field, f"unsupported image URL scheme {scheme!r}: use a base64 data URI"
                                      + (" or http(s)" if policy.allow_urls else "") if scheme else
                               "not a URL: use a base64 data URI (data:image/png;base64,...)")
    return LoadedImage(_decode(data, policy, field), hashlib.sha256(data).hexdigest())


def _decode_data_uri(url: str, policy: ImagePolicy, field: str) -> bytes:
    m = _DATA_URI.match(url)
    if m is None:
        raise InvalidParameter(field, "a data URI must read data:<type>;base64,<data>")
    if m["mime"] is not None and not m["mime"].startswith("image/"):
        raise InvalidParameter(field, f"data URI of type {m['mime']!r} is not an image")
    payload = url[m.end():]
    limit = (policy.max_bytes + 2) // 3 * 4
    if len(payload) > limit:
        raise InvalidParameter(field, f"image of about {len(payload) * 3 // 4} bytes is over the limit of "
                                      f"{policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter(field, "the data URI's payload is not valid base64") from None


def _fetch(url: str, policy: ImagePolicy, field: str) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "galerne"}),
                                    timeout=policy.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise InvalidParameter(field, f"the image at this URL ({declared} bytes) is over the limit of "
                                              f"{policy.max_bytes} bytes")
            chunks, size = [], 0
            while chunk := response.read1(1 << 16):  # what has come: the deadline is checked as it comes
                size += len(chunk)
                if size > policy.max_bytes:
                    raise InvalidParameter(field, f"the image at this URL is over the limit of {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise InvalidParameter(field, f"fetching the image took over {policy.timeout_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except InvalidParameter:
        raise
    except urllib.error.HTTPError as e:
        raise InvalidParameter(field, f"fetching the image failed: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise InvalidParameter(field, f"fetching the image failed: {reason}") from None


def _decode(data: bytes, policy: ImagePolicy, field: str) -> Image:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise InvalidParameter(field, f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:  # PIL's own bound, far above ours
        raise InvalidParameter(field, f"image dimensions are over the limits ({policy.max_side} pixels a side, "
                                      f"{policy.max_pixels} in all)") from None
    except Exception as e:  # noqa: BLE001 - a malformed header raises all kinds
        raise InvalidParameter(field, f"not a decodable image: {type(e).__name__}") from None
    w, h = image.size
    if w < 1 or h < 1 or w > policy.max_side or h > policy.max_side or w * h > policy.max_pixels:
        raise InvalidParameter(field, f"image of {w}x{h} pixels is over the limits ({policy.max_side} pixels a side, "
                                      f"{policy.max_pixels} in all)")
    try:
        image.seek(0)  # an animation: its first frame
        image.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data raises all kinds
        raise InvalidParameter(field, f"the image data is truncated or corrupt ({type(e).__name__})") from None
    return image


def check_image_format(tokenizer, args) -> None:
    """Refuse a tokenizer whose image format does not fit the vision encoder ``args``
    (``models.vision_args.VisionArgs``): patch size, merge size, image token. A tokenizer
    with no image format is allowed: the model serves text, and refuses images."""
    from .errors import ModelLoadError

    enc = getattr(tokenizer, "image_encoder", None)
    if enc is None:
        log.info("%s has no image format: the model's vision encoder is loaded, but prompts with images will be "
                 "refused (image input needs a Mistral tokenizer with an image config)", tokenizer.path.name)
        return
    cfg, ids = enc.image_config, enc.special_ids
    mine = (cfg.image_patch_size, cfg.spatial_merge_size, ids.img)
    theirs = (args.patch_size, args.spatial_merge_size, args.image_token_id)
    if mine != theirs:
        raise ModelLoadError(f"the tokenizer's image format (patch {mine[0]}, merge {mine[1]}, [IMG] id {mine[2]}) does "
                             f"not match the vision encoder's (patch {theirs[0]}, merge {theirs[1]}, [IMG] id "
                             f"{theirs[2]})", path=str(tokenizer.path))
