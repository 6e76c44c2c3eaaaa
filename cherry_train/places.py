"""Where things are on this machine: which queue root a command uses, the config folder, Colab
and its Drive mount, and how a config's data paths map onto them (docs/contract.md §7).

Root order: --root, else $CHERRY_ROOT, else the root saved by `cherry init`, else the Colab Drive
folder on Colab, else a local demo folder (with a notice saying so; `cherry worker` refuses it on
a SkyPilot VM, where it would vanish with the VM).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

COLAB_MYDRIVE = "/content/drive/MyDrive"
COLAB_ROOT = f"{COLAB_MYDRIVE}/traina"


@dataclass(frozen=True)
class ResolvedRoot:
    root: str
    source: str  # "--root", "$CHERRY_ROOT", "cherry init", "colab", "local default"

    @property
    def is_fallback(self) -> bool:
        return self.source == "local default"


def on_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def on_skypilot() -> bool:
    """A VM SkyPilot runs a task on (it sets this for every task, managed jobs included)."""
    return bool(os.environ.get("SKYPILOT_TASK_ID"))


def config_dir() -> Path:
    override = os.environ.get("CHERRY_CONFIG_DIR")
    return Path(override) if override else platformdirs.user_config_path("cherry-train")


def settings_path() -> Path:
    return config_dir() / "settings.json"


def default_local_root() -> Path:
    override = os.environ.get("CHERRY_DATA_DIR")
    base = Path(override) if override else platformdirs.user_data_path("cherry-train")
    return base / "local-root"


def saved_root() -> str | None:
    try:
        return json.loads(settings_path().read_text()).get("root")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def save_root(root: str) -> Path:
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"root": root}, indent=2) + "\n")
    return path


def _absolute(root: str) -> str:
    return root if root.startswith("gdrive:") else str(Path(root).expanduser().absolute())


def resolve_root(cli_root: str | None) -> ResolvedRoot:
    if cli_root:
        return ResolvedRoot(_absolute(cli_root), "--root")
    if os.environ.get("CHERRY_ROOT"):
        return ResolvedRoot(_absolute(os.environ["CHERRY_ROOT"]), "$CHERRY_ROOT")
    if (saved := saved_root()) is not None:
        return ResolvedRoot(saved, "cherry init")
    if on_colab():
        return ResolvedRoot(COLAB_ROOT, "colab")
    return ResolvedRoot(str(default_local_root()), "local default")


def find_my_drive() -> Path | None:
    """This machine's 'My Drive' folder: $CHERRY_MYDRIVE, the Colab mount, or Drive for Desktop."""
    if os.environ.get("CHERRY_MYDRIVE"):
        return Path(os.environ["CHERRY_MYDRIVE"]).expanduser()
    if on_colab() and Path(COLAB_MYDRIVE).is_dir():
        return Path(COLAB_MYDRIVE)
    home = Path.home()
    candidates = [home / "Google Drive" / "My Drive", home / "My Drive",
                  Path("/Volumes/GoogleDrive/My Drive"), Path("G:/My Drive")]
    cloud = home / "Library" / "CloudStorage"  # macOS Drive for Desktop: GoogleDrive-<account>
    if cloud.is_dir():
        candidates += sorted(p / "My Drive" for p in cloud.glob("GoogleDrive-*"))
    return next((c for c in candidates if c.is_dir()), None)


class PathMappingError(ValueError):
    pass


def remote_location(path: str, root: Path | None, storage) -> tuple[Any, str] | None:
    """Where a config's path is when it must be fetched through a Drive API root's storage:
    (storage, path in it), or None when the file system has it.

    On an API root (no local folder), a relative path is below the queue folder, and a Colab
    path (/content/drive/MyDrive/...) on a machine without that folder (no Colab mount, no
    Drive for Desktop) is the same path under My Drive, read through the API."""
    if root is not None:
        return None
    if not path.startswith(("/", "~")) and ":" not in path:
        return storage, path
    sibling = getattr(storage, "sibling", None)
    if sibling is not None and path.startswith(COLAB_MYDRIVE + "/") and find_my_drive() is None:
        return sibling(""), path[len(COLAB_MYDRIVE) + 1:]
    return None


def map_data_path(path: str, root: Path | None) -> Path:
    """Where a config's data path is on this machine.

    /content/drive/MyDrive/<rest> is the Colab mount; elsewhere it maps to this machine's
    My Drive. A relative path is relative to the queue root (when that is a local folder)."""
    if path == COLAB_MYDRIVE or path.startswith(COLAB_MYDRIVE + "/"):
        if on_colab() and not os.environ.get("CHERRY_MYDRIVE"):
            return Path(path)
        my_drive = find_my_drive()
        if my_drive is None:
            raise PathMappingError(
                f"{path} is a Colab Drive path, and this machine has no My Drive folder: set "
                "CHERRY_MYDRIVE to your Drive for Desktop 'My Drive' folder")
        return my_drive / path[len(COLAB_MYDRIVE):].lstrip("/")
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if root is None:
        raise PathMappingError(f"{path} is relative, and the queue root is not a local folder")
    return root / p
