"""The resident share of a split decoded in the background while the job already trains.

A split (gpusplit.py) keeps a share of the set decoded in GPU memory. Decoding it first held a
restarted worker's first step back by the whole share: 42,000 images, 8 s of a 20 s restart on
an H100 (docs/benchmarks.md). Here training starts at once, and once its first step is under
way a thread fills the cache chunk by chunk on its own CUDA stream, marking each row ready once
the GPU has written it; until then the sample is streamed (decoded from its bytes, as
gpustream.py does for the rest of the set). The loader processes read the marks from shared
memory when they draw a sample, so a sample is served from the cache from the first batch
drawn after its row is ready.

Which of the two a step gets then depends on how far the fill had come, and their pixels differ
by resampling (a crop of the stored copy, or of the decoded file). So only jobs that allow that
grow their share this way (data.py: not deterministic: true, no resident_share pinned); the
data order and every crop box and flip stay those of the (seed, epoch, index), as always.
"""

from __future__ import annotations

import contextlib
import threading
import time

import structlog
import torch

from cherry_train.worker.inputs.gpudata import DecodedImages, decode_rows, say_decoded
from cherry_train.worker.inputs.samples import ImageFolderSamples

log = structlog.get_logger(__name__)

#: Rows decoded between two marks (and two looks at a stop): the cache serves samples from the
#: first second on, and a stop waits at most one chunk.
CHUNK = 512
#: Images per nvJPEG call here: its full-size outputs take GPU memory beside training (64 photos
#: of 1600x1200: 370 MB; a set-up decode's 256 would take 1.5 GB).
NVJPEG_BATCH = 64
#: How long a stop waits for the thread's chunk before it says so and goes on.
STOP_SECONDS = 60.0


class Fill:
    """The first `count` images of a set, decoded into `decoded` by a thread. `ready[i]` (in
    shared memory: loader processes read it) turns 1 once row i and its size are written and
    the GPU has finished them; `error` holds what stopped the thread early, for the training
    loop to raise."""

    def __init__(self, samples: ImageFolderSamples, side: int, device: torch.device, count: int):
        self.samples, self.side, self.count = samples, side, count
        self.ready = torch.zeros(count, dtype=torch.uint8).share_memory_()
        sizes = torch.zeros((count, 2), dtype=torch.int64).share_memory_()
        labels = torch.tensor([label for _, label in samples.samples[:count]], device=device)
        images = torch.empty((count, 3, side, side), dtype=torch.uint8, device=device)
        self.decoded = DecodedImages(images, sizes, labels, 0.0)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cherry-resident-fill",
                                        daemon=True)

    def start(self) -> None:
        """Begin decoding (gpusplit starts it once the first step is under way: on 2 cores,
        decoding beside the first streamed batch and cuDNN's choice of kernels would hold the
        first step back by about as long as decoding first did)."""
        if not self.started and not self._stop.is_set():
            self._thread.start()
            log.info("decoding the resident share in the background", images=self.count,
                     side=self.side, why="training has started; each sample is served from "
                     "GPU memory once its row is decoded, streamed until then")

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def done(self) -> bool:
        return self.started and not self._thread.is_alive()

    def _run(self) -> None:
        started = time.perf_counter()
        images, sizes = self.decoded.images, self.decoded.sizes.numpy()  # the shared memory
        cuda = images.device.type == "cuda"
        stream = torch.cuda.Stream(images.device) if cuda else None
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for start in range(0, self.count, CHUNK):
                    if self._stop.is_set():
                        return
                    rows = range(start, min(start + CHUNK, self.count))
                    decode_rows(self.samples, rows, self.side, images, sizes, num_workers=0,
                                batch=NVJPEG_BATCH, raise_oom=True)
                    if stream is not None:
                        stream.synchronize()  # written, before a loader may serve them
                    self.ready[rows.start:rows.stop] = 1
        except torch.cuda.OutOfMemoryError:
            # The decode's own buffers (a chunk at full size) did not fit beside training: the
            # rows not decoded stay streamed, as fast as a smaller split. Nothing is lost.
            done = int(self.ready.sum())
            log.warning("resident share: decoding stopped, out of GPU memory", decoded=done,
                        streamed=self.count - done, why="the rest of it is streamed per batch")
            return
        except BaseException as e:  # raised by the training loop at its next batch
            self.error = e
            return
        self.decoded.seconds = time.perf_counter() - started
        say_decoded("train", self.decoded, len(self.samples) - self.count, in_background=True)

    def check(self) -> None:
        """Raise what stopped the fill (an image that does not decode, as decode_all would)."""
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the thread after its chunk (the job's attempt ends)."""
        self._stop.set()
        if self.started:
            self._thread.join(timeout=STOP_SECONDS)
            if self._thread.is_alive():  # its cache stays allocated until it ends
                log.warning("resident share: the decoding thread did not end in time",
                            seconds=STOP_SECONDS)
