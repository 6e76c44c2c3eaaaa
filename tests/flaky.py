"""A backend that fails like the Colab Drive mount: Errno 107 / EIO on a share of calls, some
of them after the operation took effect (the answer was lost, not the write)."""

from __future__ import annotations

import errno
import random

from cherry_train.storage import LocalStorage


class FlakyStorage(LocalStorage):
    def __init__(self, root, rate: float = 0.3, seed: int = 0):
        super().__init__(root)
        self.rng = random.Random(seed)
        self.rate = rate
        self.failures = 0

    def _maybe_fail(self, name: str, when: str) -> None:
        if self.rng.random() < self.rate / 2:
            self.failures += 1
            code = self.rng.choice([errno.ENOTCONN, errno.EIO])
            raise OSError(code, f"injected {errno.errorcode[code]} {when} {name}")


def _flaky(name):
    original = getattr(LocalStorage, name)

    def method(self, *args):
        self._maybe_fail(name, "before")
        value = original(self, *args)
        self._maybe_fail(name, "after")
        return value
    return method


for _name in ("read_bytes", "read_range", "write_atomic", "create_exclusive", "list_dir",
              "stat", "move", "delete", "upload", "download"):
    setattr(FlakyStorage, _name, _flaky(_name))
