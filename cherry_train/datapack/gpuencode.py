"""Preparing images with torchvision on a device (`cherry data pack --device cuda`): on CUDA,
nvJPEG decodes a batch of JPEGs in one call (the hardware decoder on A100/H100), the GPU
resizes them, and encode_jpeg encodes them there. What it cannot take (PNGs, CMYK JPEGs, a
file cut short or that the device refuses) goes through prepare.py's Pillow path, one image at
a time, as do the small JPEGs stored as they are (Pillow checks that they decode), so the
results are prepare_file's: the same sizes, and the same error for a file that does not decode.

torch is imported only here, and only once a device build is asked for: the laptop client
imports the rest of datapack without it."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from PIL import Image

from cherry_train.datapack.index import PackError
from cherry_train.datapack.prepare import (
    NOT_AN_IMAGE,
    Encoding,
    Prepared,
    kept_as_is,
    prepare_bytes,
    stored_size,
)

log = structlog.get_logger(__name__)

#: Images decoded in one call: nvJPEG's batched decode pays its set-up once per call.
BATCH = 64
#: Decoded pixels one batch may hold (3 bytes each on the device, plus one image at a time in
#: float for its resize): 64 photos of 1600x1200 fit; 24-megapixel ones go 5 at a time.
BATCH_PIXELS = 128 << 20
#: An encoded image must decode back within this mean absolute difference (0-255) of what was
#: encoded, or Pillow encodes it instead. White noise at quality 50 differs by about 21; an
#: encode gone wrong (CUDA encodes have come out corrupt: pytorch/vision#8587, #9060) by far
#: more, or does not decode at all. The per-sample sha256 in the index guards the stored bytes,
#: not whether they are the image.
LIKENESS = 40
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"


def pick_device(choice: str) -> str | None:
    """`--device` cuda | cpu | auto → the torch device to prepare on, or None for Pillow in a
    process pool (`cpu`, and `auto` without a usable CUDA GPU). PackError says why `cuda`
    cannot be had here."""
    if choice == "cpu":
        return None
    try:
        import torch
        import torchvision  # noqa: F401  (its image ops are what the device path runs)
    except ImportError:
        if choice == "auto":
            return None
        raise PackError("--device cuda needs torch and torchvision (pip install "
                        "'cherry-train[worker]'); --device cpu prepares with Pillow") from None
    if not torch.cuda.is_available():
        if choice == "auto":
            return None
        raise PackError("--device cuda: this machine has no CUDA GPU that torch can use; "
                        "--device cpu prepares with Pillow on its cores")
    try:  # a tiny image through nvJPEG both ways: a build never meets a decoder it lacks
        DeviceEncoder(Encoding(8), "cuda").probe()
    except RuntimeError as e:
        if choice == "auto":
            log.warning(f"JPEG on the GPU does not work here ({e}): preparing with Pillow")
            return None
        raise PackError(f"--device cuda: torchvision cannot decode or encode JPEG on this GPU "
                        f"({e}); --device cpu prepares with Pillow") from None
    return "cuda"


def encoder_name(device: str) -> str:
    """What the index's prepared.encoder records for a build on `device`."""
    import torch
    import torchvision

    where = device
    if torch.device(device).type == "cuda":
        where += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return f"torchvision {torchvision.__version__} on {where}"


@dataclass
class _Item:
    rel: str
    raw: bytes
    width: int
    height: int
    as_is: bool  # prepare.kept_as_is: stored as it is once it decodes


class DeviceEncoder:
    """Images (rel, bytes), in order, to Prepared results, in the same order: JPEGs in batches
    on `device`, the rest (and any the device refuses) by Pillow. `encode` is torchvision's
    encode_jpeg unless a test passes another. `by_pillow`: what the device left to Pillow (not
    the small JPEGs kept as they are, which never go to the device)."""

    def __init__(self, encoding: Encoding, device: str, encode: Callable | None = None):
        import torch

        if encode is None:
            from torchvision.io import encode_jpeg as encode
        self.encoding, self.device, self._encode_jpeg = encoding, torch.device(device), encode
        self.by_pillow: list[str] = []

    def prepare(self, images: Iterable[tuple[str, bytes]]) -> Iterator[Prepared]:
        batch: list[_Item | tuple[str, bytes]] = []
        pixels = 0
        for rel, raw in images:
            item = _jpeg_item(rel, raw, self.encoding.short_side)
            cost = 0 if item is None else item.width * item.height
            if batch and (len(batch) >= BATCH or pixels + cost > BATCH_PIXELS):
                yield from self._batch(batch)
                batch, pixels = [], 0
            batch.append(item or (rel, raw))
            pixels += cost
        if batch:
            yield from self._batch(batch)
        if self.by_pillow:
            log.info(f"{len(self.by_pillow)} images prepared by Pillow instead of on "
                     f"{self.device}: not JPEG, CMYK, cut short, or refused there",
                     first=self.by_pillow[0])

    def probe(self) -> None:
        """One 8x8 image encoded and decoded on the device; RuntimeError if it cannot, or if
        its encoder stores another chroma subsampling than the encoding's (torchvision has no
        setting for it: nvJPEG's encode keeps 4:4:4, libjpeg's on the CPU makes 4:2:0)."""
        import torch
        from torchvision.io import decode_jpeg

        with _quiet():
            image = torch.zeros((3, 8, 8), dtype=torch.uint8, device=self.device)
            data = self._encode_jpeg([image], quality=self.encoding.quality)[0].cpu()
            decode_jpeg([data], device=self.device)
        chroma = _chroma(data.numpy().tobytes())
        if chroma != self.encoding.chroma:
            raise RuntimeError(f"torchvision's JPEG encoder on {self.device} stores chroma "
                               f"{chroma}, the pack {self.encoding.chroma}")

    def _batch(self, batch: list[_Item | tuple[str, bytes]]) -> list[Prepared]:
        """One batch's results in order; each image the device could not do by Pillow."""
        out: dict[int, Prepared] = {}
        jpegs = []
        for k, item in enumerate(batch):
            if isinstance(item, _Item) and item.as_is:  # small: Pillow checks it decodes
                out[k] = prepare_bytes(item.rel, item.raw, self.encoding)
            elif isinstance(item, _Item):
                jpegs.append(k)
        with _quiet():
            decoded = self._decode([_tensor(batch[k].raw) for k in jpegs])
            todo, images = [], []
            for k, image in zip(jpegs, decoded, strict=True):
                item = batch[k]
                if image is None or tuple(image.shape) != (3, item.height, item.width):
                    continue  # Pillow's turn, below: it decodes it or says why not
                width, height = stored_size(item.width, item.height, self.encoding.short_side)
                todo.append((k, width, height))
                images.append(_resized(image, width, height))
            del decoded  # the full-size images: the device memory goes back before the encode
            encoded = self._encoded(images, [batch[k].rel for k, _, _ in todo])
        for (k, width, height), data in zip(todo, encoded, strict=True):
            if data is not None:
                out[k] = Prepared(batch[k].rel, len(batch[k].raw), data, width, height)
        results = []
        for k, item in enumerate(batch):
            if k not in out:
                rel, raw = (item.rel, item.raw) if isinstance(item, _Item) else item
                self.by_pillow.append(rel)
                out[k] = prepare_bytes(rel, raw, self.encoding)
            results.append(out[k])
        return results

    def _encoded(self, images: list, rels: list[str]) -> list[bytes | None]:
        """The images as baseline JPEG bytes, each checked by decoding it back on the device;
        None for one that fails (Pillow encodes it)."""
        import torch

        if not images:
            return []
        encoded = [None if t is None else t.cpu() for t in self._encode(images)]
        back = iter(self._decode([t for t in encoded if t is not None]))
        differences = torch.stack([_difference(None if data is None else next(back), image)
                                   for data, image in zip(encoded, images, strict=True)])
        out: list[bytes | None] = []
        for rel, data, diff in zip(rels, encoded, differences.tolist(), strict=True):
            if diff > LIKENESS:
                log.warning(f"{rel}: torchvision's JPEG encode on {self.device} does not "
                            "decode back to the image; Pillow encodes it instead")
                out.append(None)
            else:
                out.append(data.numpy().tobytes())
        return out

    def _decode(self, data: list) -> list:
        from torchvision.io import ImageReadMode, decode_jpeg

        return self._each(lambda part: decode_jpeg(part, mode=ImageReadMode.RGB,
                                                   device=self.device), data)

    def _encode(self, images: list) -> list:
        return self._each(lambda part: self._encode_jpeg(part, quality=self.encoding.quality),
                          images)

    def _each(self, fn: Callable[[list], list], items: list) -> list:
        """fn on the whole list (on CUDA one batched call); if that fails (one bad image fails
        the batch, and returns nothing; or the batch did not fit in memory: OutOfMemoryError
        is a RuntimeError), fn on each alone, None for those that fail."""
        if not items:
            return []
        self._settle()
        try:
            return list(fn(items))
        except RuntimeError as e:
            log.info(f"a batch of {len(items)} failed on {self.device} "
                     f"({type(e).__name__}: {str(e)[:200]}); one by one instead")
        out = []
        for item in items:
            self._settle()
            try:
                out.append(fn([item])[0])
            except RuntimeError:
                out.append(None)
        return out

    def _settle(self) -> None:
        """Before each decode or encode on CUDA, the work queued on the current stream is
        finished: torchvision's nvJPEG calls run on streams of their own, not ordered after
        ours, and have read or written memory our stream was still using
        (pytorch/vision#8929, #9606). It costs next to nothing here: each call's results are
        waited for right after it anyway."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def _jpeg_item(rel: str, raw: bytes, short_side: int) -> _Item | None:
    """The image as an _Item when it is a whole JPEG the device may decode (RGB or grey,
    baseline or progressive: what nvJPEG refuses goes to Pillow then); None for what Pillow
    takes at once (other formats, CMYK, a file Pillow cannot open, whose error is then Pillow's
    as today). Only the header is read. A JPEG without its end marker was cut short: Pillow
    refuses it, and nvJPEG may decode the rest as grey, so Pillow's word is taken (a pack is
    the same whoever built it)."""
    if not raw.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            return _Item(rel, raw, *im.size, kept_as_is(im, short_side))
    except NOT_AN_IMAGE:
        return None


def _tensor(raw: bytes):
    import torch

    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _difference(again, image):
    """How far an image decoded back is from what was encoded: the mean absolute difference
    (0-255), a 0-d tensor on the device; inf when it did not decode, or not at that size."""
    import torch

    if again is None or again.shape != image.shape:
        return torch.tensor(float("inf"), device=image.device)
    return (again.float() - image.float()).abs().mean()


def _resized(image, width: int, height: int):
    """CHW uint8 at (width, height), bicubic with antialiasing: the filter Pillow's path
    resizes with (its draft-mode decode at 1/2, 1/4, 1/8 aside: here the full image is decoded,
    which the GPU does faster than it can be skipped). torchvision's resize, not interpolate
    on floats: on the CPU it resizes uint8 natively, 30 times faster (2.7 vs 84 ms a photo)."""
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    return resize(image, [height, width], interpolation=InterpolationMode.BICUBIC,
                  antialias=True).contiguous()


@contextmanager
def _quiet():
    """torchvision 0.29 warns on every decode and encode that its image io moves to
    TorchCodec; the calls work, and thousands of the same warning would bury the build's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        yield


def _chroma(data: bytes) -> str:
    """A JPEG's chroma subsampling, as Pillow names it ("4:4:4", "4:2:2", "4:2:0")."""
    from PIL import JpegImagePlugin

    with Image.open(io.BytesIO(data)) as im:
        return {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(JpegImagePlugin.get_sampling(im), "other")
