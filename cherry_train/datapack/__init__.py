"""Packed copies of data folders: a few large tar shards and an index, beside the folder.

Through the Colab Drive mount every file open is a network round trip, so copying 60,000 small
JPEGs to the VM one by one takes minutes, however many threads do it; copying fourteen 256 MB
files takes as long as the bytes take. A pack is built once (`cherry data pack PATH` on the
laptop, or by the first worker that copies the folder) and every later VM copies its shards.

    <parent>/<name>.cherry-pack/index.json          every file: the original's size and mtime,
                                                     its stored bytes' shard, offset, length,
                                                     sha256, the stored image's width, height
    <parent>/<name>.cherry-pack/shard-<sha>.tar      uncompressed tar (JPEGs do not compress)

A pack is verbatim (the files as they are, unpacked into the worker's cache) or prepared
(`--image-size N`: every image re-encoded once as baseline JPEG at the short side training
stores, sizes.stored_side, by Pillow in a process pool or by torchvision on a GPU: gpuencode.py;
read in place from the fetched shards: reader.py). A prepared pack serves any image size whose
stored side is at most its own; a larger one is refused in words, never up-scaled.

Beside the folder, not in it: a folder inside would be one more class to ImageFolder. The
index is written last (a build cut short leaves no index that names missing shards), and shards
are named by their content, so two builders never write different bytes under one name. A
worker uses the pack for the files whose path, size and modification time still match the
folder (the folder is listed anyway, to notice changes); other files are copied one by one,
and a worker that finds the pack stale rebuilds it. Every sample is checked against its
sha256 in the index as it is copied. What a pack costs in Drive space is said at build time.
"""

from cherry_train.datapack.build import build_pack, list_folder, pack_folder
from cherry_train.datapack.gpuencode import pick_device
from cherry_train.datapack.index import (
    AUTO_MIN_FILES,
    DEFAULT_MIN_CROP_SCALE,
    FORMAT,
    INDEX,
    PACK_SUFFIX,
    FolderPackPlace,
    PackError,
    PackIndex,
    PackPlace,
    StoragePackPlace,
)
from cherry_train.datapack.prepare import DEFAULT_QUALITY, Encoding
from cherry_train.datapack.reader import Fetched, PackedFiles, fetch_shards
from cherry_train.datapack.unpack import unpack

__all__ = ["AUTO_MIN_FILES", "DEFAULT_MIN_CROP_SCALE", "DEFAULT_QUALITY", "FORMAT", "INDEX",
           "PACK_SUFFIX", "Encoding", "Fetched", "FolderPackPlace", "PackError", "PackIndex",
           "PackPlace", "PackedFiles", "StoragePackPlace", "build_pack", "fetch_shards",
           "list_folder", "pack_folder", "pick_device", "unpack"]
