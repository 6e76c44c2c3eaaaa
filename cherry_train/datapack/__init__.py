"""Packed copies of data folders: a few large tar shards and an index, beside the folder.

Through the Colab Drive mount every file open is a network round trip, so copying 60,000 small
JPEGs to the VM one by one takes minutes, however many threads do it; copying fourteen 256 MB
files takes as long as the bytes take. A pack is built once (`cherry data pack PATH` on the
laptop, or by the first worker that copies the folder) and every later VM unpacks it.

    <parent>/<name>.cherry-pack/index.json          every file: size, mtime, sha256, its shard
    <parent>/<name>.cherry-pack/shard-<sha>.tar      uncompressed tar (JPEGs do not compress)

Beside the folder, not in it: a folder inside would be one more class to ImageFolder. The
index is written last (a build cut short leaves no index that names missing shards), and shards
are named by their content, so two builders never write different bytes under one name. A
worker uses the pack for the files whose path, size and modification time still match the
folder (the folder is listed anyway, to notice changes); other files are copied one by one,
and a worker that finds the pack stale rebuilds it. Every unpacked file is checked against its
sha256 in the index. A pack costs as much Drive space as the folder: it is said at build time.
"""

from cherry_train.datapack.build import build_pack, list_folder, pack_folder, plan_shards
from cherry_train.datapack.index import (
    AUTO_MIN_FILES,
    INDEX,
    PACK_SUFFIX,
    FolderPackPlace,
    PackError,
    PackIndex,
    PackPlace,
    StoragePackPlace,
)
from cherry_train.datapack.unpack import unpack

__all__ = ["AUTO_MIN_FILES", "INDEX", "PACK_SUFFIX", "FolderPackPlace", "PackError", "PackIndex",
           "PackPlace", "StoragePackPlace", "build_pack", "list_folder", "pack_folder",
           "plan_shards", "unpack"]
