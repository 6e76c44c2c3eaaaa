"""One image made ready for a pack: re-encoded once at the short side training stores (a
prepared pack), or only its width and height read (a verbatim pack). Runs in a process pool:
plain functions of a path and plain results."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

#: JPEG quality of prepared images. 90 is FFCV's default and what ImageNet pipelines store
#: at without a measurable accuracy cost; 75 (Pillow's default) shows blocking at 224 px on
#: fine texture such as a cherry's skin, and 95 nearly doubles the bytes for no gain.
DEFAULT_QUALITY = 90

#: Chroma subsampling of prepared images: none. Pillow's default, 4:2:0, keeps colour at half
#: the width and height, and at the small sides training stores that is a loss the originals
#: do not have (48 px training stores 64 px: colour at 32); a cherry's defects are colour.
#: Trained from 4:2:0 packs the demo task at photo size lost 3 points of validation accuracy
#: against the original files, 4:4:4 is within 1 (docs/benchmarks.md); it costs ~16% more bytes.
DEFAULT_CHROMA = "4:4:4"

#: What packs built before the index said their chroma were: Pillow's default.
UNRECORDED_CHROMA = "4:2:0"

#: What Pillow raises for a file that is not an image it can decode (a decompression bomb
#: included: a 200-megapixel "photo" in a shared folder is refused, not decoded).
NOT_AN_IMAGE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Encoding:
    """How a prepared pack stores images: short side in pixels (sizes.stored_side of the
    image size it is made for), baseline JPEG at `quality` with `chroma` subsampling."""

    short_side: int
    quality: int = DEFAULT_QUALITY
    chroma: str = DEFAULT_CHROMA


@dataclass(frozen=True)
class Prepared:
    rel: str
    read: int  # bytes read from the original (a changed file is noticed)
    data: bytes | None  # None: the original did not decode
    width: int | None
    height: int | None
    error: str | None = None


def dims(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from an image's header; (None, None) for what Pillow cannot open."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except NOT_AN_IMAGE:
        return None, None


def prepare_file(folder: Path, encoding: Encoding, rel: str) -> Prepared:
    """The original at folder/rel as the pack stores it. A file that cannot be read raises
    (OSError: the build stops); one that does not decode comes back with its error."""
    return prepare_bytes(rel, (folder / rel).read_bytes(), encoding)


def prepare_bytes(rel: str, raw: bytes, encoding: Encoding) -> Prepared:
    """prepare_file on bytes already read (the device path hands over what it cannot take)."""
    try:
        data, width, height = encode(raw, encoding)
    except NOT_AN_IMAGE as e:
        return Prepared(rel, len(raw), None, None, None, f"{type(e).__name__}: {e}")
    return Prepared(rel, len(raw), data, width, height)


def stored_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The stored image's (width, height): the aspect kept, the short side brought down to
    short_side, never up (a smaller image keeps its own size). Both encoders use it, so a pack
    has the same image sizes whichever built it."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    scale = short_side / short
    return (short_side if width == short else max(1, round(width * scale)),
            short_side if height == short else max(1, round(height * scale)))


def kept_as_is(im: Image.Image, short_side: int) -> bool:
    """A baseline RGB or grey JPEG already small enough is stored as it is (once it is known
    to decode): re-encoding it would only lose quality."""
    return min(im.size) <= short_side and im.format == "JPEG" and \
        not im.info.get("progressive") and im.mode in ("RGB", "L")


def encode(raw: bytes, encoding: Encoding) -> tuple[bytes, int, int]:
    """(stored bytes, width, height) at stored_size, baseline JPEG; kept_as_is images are
    decoded once, to know they decode, and stored as they are."""
    with Image.open(io.BytesIO(raw)) as im:
        if kept_as_is(im, encoding.short_side):
            im.load()
            return raw, *im.size
        width, height = stored_size(*im.size, encoding.short_side)
        # JPEG draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 scale, the smallest that is
        # still at least this size: a 1600x1200 photo for side 317 decodes at 800x600, a
        # quarter of the pixels and of the time, and the resize below has less to do.
        im.draft("RGB", (width, height))
        img = im.convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        # Baseline (not progressive): the GPU's hardware JPEG decoder takes only baseline.
        img.save(out, "JPEG", quality=encoding.quality, progressive=False,
                 subsampling=encoding.chroma)
        return out.getvalue(), width, height
