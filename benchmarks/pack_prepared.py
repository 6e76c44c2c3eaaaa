"""Building a data pack on a laptop-sized CPU: verbatim vs prepared (`cherry data pack PATH
--image-size N`), for 1600x1200 photos (issue 24: pack bytes <= 0.2x the originals).

    taskset -c 0,1 python benchmarks/pack_prepared.py [--images 500] [--image-size 224]
        [--device cpu|cuda]

Generates the photos first (train_throughput.make_dataset's smooth noisy photos at 1600x1200,
~0.5 MB each; not timed), then, on the cores this process may use:
1. the verbatim pack (`cherry data pack PATH`, the baseline: the files as they are);
2. the prepared pack for `--image-size` (every image re-encoded at sizes.stored_side);
3. its rebuild after 2% of the photos changed (the others' stored bytes reused);
4. the same prepared pack built by torchvision on `--device` (`cherry data pack --device cuda`
   on a GPU; on `cpu` the same code on this machine's cores), from scratch, with how far its
   images are from Pillow's (mean absolute difference of the decoded pixels, 0-255);
and per image on one core: Pillow's decode of an original vs of its prepared copy (what every
training step pays per image), and one re-encode with and without JPEG draft mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin

from cherry_train import datapack
from cherry_train.datapack.prepare import encode
from cherry_train.sizes import human_bytes, stored_side

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import make_dataset  # noqa: E402  (the same photos as the GPU figures)


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def per_image_ms(fn, items) -> float:
    seconds, _ = timed(lambda: [fn(item) for item in items])
    return 1000 * seconds / len(items)


def decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB")


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--min-crop-scale", type=float, default=datapack.DEFAULT_MIN_CROP_SCALE)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where torchvision builds the pack of step 4")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    side = stored_side(args.image_size, args.min_crop_scale)
    encoding = datapack.Encoding(side)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made, _ = timed(lambda: make_dataset(tmp / "data", args.images, (1600, 1200)))
        train = tmp / "data" / "train"
        photos = sorted(train.rglob("*.jpg"))
        originals = sum(p.stat().st_size for p in photos)
        print(f"{len(photos)} photos 1600x1200, {human_bytes(originals)}, made in {made:.0f} s; "
              f"{cores} cores, {platform.processor() or platform.machine()}", flush=True)
        os.sync()

        verbatim_s, (verbatim, _, _) = timed(lambda: datapack.pack_folder(train))
        shutil.rmtree(tmp / "data" / f"train{datapack.PACK_SUFFIX}")
        prepared_s, (prepared, place, _) = timed(
            lambda: datapack.pack_folder(train, encoding=encoding,
                                         prepared_for={"image_size": args.image_size}))
        for path in photos[:: 50]:  # 2% changed: new pixels, a later mtime
            Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=90)
        rebuild_s, (rebuilt, _, _) = timed(
            lambda: datapack.pack_folder(train, encoding=encoding,
                                         prepared_for={"image_size": args.image_size}))

        sample = photos[:40]
        raws = [p.read_bytes() for p in sample]
        files = datapack.PackedFiles(rebuilt, place.path)
        stored = [files.read(p.relative_to(train).as_posix()) for p in sample]
        files.close()
        full_ms = per_image_ms(decode, raws)
        small_ms = per_image_ms(decode, stored)
        draft_ms = per_image_ms(lambda raw: encode(raw, encoding), raws)
        keep = JpegImagePlugin.JpegImageFile.draft
        JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
        try:
            no_draft_ms = per_image_ms(lambda raw: encode(raw, encoding), raws)
        finally:
            JpegImagePlugin.JpegImageFile.draft = keep

        shutil.rmtree(place.path)  # else the Pillow pack is current, whoever asks
        import torchvision  # noqa: F401  (not timed: the import, ~3 s, is paid once per command)
        # torchvision's CPU encoder stores chroma 4:2:0 (no setting; nvJPEG keeps 4:4:4): the
        # CPU stand-in asks for what it makes, else the build refuses the mismatch.
        on = encoding if args.device == "cuda" else dataclasses.replace(encoding, chroma="4:2:0")
        device_s, (on_device, place, _) = timed(
            lambda: datapack.pack_folder(train, encoding=on, device=args.device,
                                         prepared_for={"image_size": args.image_size}))
        files = datapack.PackedFiles(on_device, place.path)
        differ = [np.abs(pixels(files.read(p.relative_to(train).as_posix())) - pixels(s)).mean()
                  for p, s in zip(sample, stored, strict=True)]
        files.close()

    n = len(photos)
    print(f"\n| pack of {n} photos 1600x1200 ({human_bytes(originals)}) | build s | images/s | "
          "pack bytes | vs originals |")
    print("|---|---|---|---|---|")
    print(f"| verbatim (`cherry data pack PATH`, baseline) | {verbatim_s:.1f} | "
          f"{n / verbatim_s:,.0f} | {human_bytes(verbatim.bytes)} | "
          f"{verbatim.bytes / originals:.2f}x |")
    print(f"| prepared, `--image-size {args.image_size}` (short side {side}, JPEG q"
          f"{encoding.quality}) | {prepared_s:.1f} | {n / prepared_s:,.0f} | "
          f"{human_bytes(prepared.bytes)} | **{prepared.bytes / originals:.3f}x** |")
    print(f"| prepared, rebuilt after {len(photos[::50])} photos changed | {rebuild_s:.1f} | "
          f"- | {human_bytes(rebuilt.bytes)} | {rebuilt.bytes / originals:.3f}x |")
    print(f"| prepared, `--device {args.device}` ({on_device.prepared['encoder']}) | "
          f"{device_s:.1f} | {n / device_s:,.0f} | {human_bytes(on_device.bytes)} | "
          f"{on_device.bytes / originals:.3f}x |")
    print(f"\nPer image, one core: decode an original {full_ms:.1f} ms, its prepared copy "
          f"{small_ms:.1f} ms ({full_ms / small_ms:.1f}x less); re-encode with draft mode "
          f"{draft_ms:.1f} ms, without {no_draft_ms:.1f} ms ({no_draft_ms / draft_ms:.1f}x).\n"
          f"The `--device {args.device}` pack's images vs Pillow's ({len(differ)} photos): mean "
          f"absolute pixel difference {np.mean(differ):.2f} (max {np.max(differ):.2f}) of 255.")


if __name__ == "__main__":
    main()
