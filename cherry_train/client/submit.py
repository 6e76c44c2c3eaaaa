"""`cherry submit`: read and validate a config, run a quick pre-flight, queue the job."""

from __future__ import annotations

import getpass
import importlib.util
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cherry_train import __version__, datachecks
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.layout import JobPaths, best_for_final, weights_here
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import job_view
from cherry_train.places import PathMappingError, map_data_path, remote_location
from cherry_train.safepaths import UnsafePath, Walk, inside, plain_name, walk_files
from cherry_train.schemas import ConfigError, Manifest, TrainingConfig, parse_config
from cherry_train.sizes import human_bytes
from cherry_train.storage.base import Storage

#: A worker that wrote its status this recently is taken to be alive (it polls every <= 30 s).
WORKER_FRESH_SECONDS = 120


def load_config_file(path: Path, name: str | None = None,
                     priority: int | None = None) -> TrainingConfig:
    """The config at `path`, validated, with --name/--priority applied; ConfigError if not."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"(file): {path} does not exist"]) from None
    except IsADirectoryError:
        raise ConfigError([f"(file): {path} is a folder, not a YAML file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"(file): cannot read {path}: {e}"]) from None
    if not text.strip():
        raise ConfigError([f"(file): {path} is empty"])
    config = parse_config(text, default_name=Path(path).stem)
    overrides = {k: v for k, v in (("name", name), ("priority", priority)) if v is not None}
    if overrides:
        from cherry_train.schemas import validate_config

        config = validate_config({**config.model_dump(exclude_none=True), **overrides})
    return config


def resolve_evaluated_job(queue: JobQueue, config: TrainingConfig) -> TrainingConfig:
    """For evaluate.job: the full id in place of a short one (`cancel` and `fetch` take those
    too, the worker does not search), the job checked to have best weights to evaluate, and
    its model filled in when the config leaves `model:` out. Other configs as they are."""
    ev = config.evaluate
    if ev is None or ev.job is None:
        return config
    from cherry_train.client.jobs import NoSuchJob, find_job

    try:
        job_id = find_job(queue, ev.job)
    except NoSuchJob as e:
        raise ConfigError([f"evaluate.job: {str(e).removeprefix('JOB: ')}"]) from None
    view = job_view(queue, job_id)
    if view.state.value != "succeeded":
        raise ConfigError([f"evaluate.job: job {job_id} is {view.state.value}; only a "
                           "succeeded job's best weights can be evaluated"])
    if not queue.storage.exists(JobPaths(job_id).best_weights):
        raise ConfigError([f"evaluate.job: job {job_id} has no best weights (an evaluation "
                           "itself?); only a succeeded training job's can be evaluated"])
    update: dict = {"evaluate": {**ev.model_dump(), "job": job_id}}
    if config.model is None and view.manifest is not None:
        update["model"] = view.manifest.config.model.model_dump()
    from cherry_train.schemas import validate_config

    return validate_config({**config.model_dump(exclude_none=True), **update})


def check_model_name(config: TrainingConfig) -> str:
    """Check the model against torchvision, when it is installed here. Returns what was done."""
    if importlib.util.find_spec("torchvision") is None:
        return f"{config.model.name}: not checked (no torchvision here; the worker checks it)"
    if config.model.name.startswith("timm/") and importlib.util.find_spec("timm") is None:
        return (f"{config.model.name}: not checked (no timm here; the worker needs it: pip "
                "install 'cherry-train[timm]')")
    from cherry_train.worker.errors import JobError
    from cherry_train.worker.training.model import check_model_name as check

    try:
        check(config.model.name)
    except JobError as e:
        raise ConfigError([str(e)]) from None
    kind = "timm" if config.model.name.startswith("timm/") else "torchvision classification"
    return f"{config.model.name} is a {kind} model"


@dataclass
class Preflight:
    checks: list[tuple[str, str]] = field(default_factory=list)  # (what, result)

    def render(self) -> str:
        width = max((len(k) for k, _ in self.checks), default=0)
        return "\n".join(["pre-flight:"] + [f"  {k.ljust(width)}  {v}" for k, v in self.checks])


#: Images per split that pre-flight decodes (spread over the classes).
DECODE_SAMPLE = 16
SMOKE_IMAGES_PER_CLASS = 4  # downloaded from a Drive API root for the training steps
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_images(path: Path, links: list[str]) -> dict[str, list[Path]]:
    """class -> its images, as the worker will see them: hidden names left out and no symbolic
    link followed (safepaths.walk_files); the links met are added to `links`."""
    found: dict[str, list[Path]] = {}
    with os.scandir(path) as entries:
        top = sorted(entries, key=lambda e: e.name)
    for entry in top:
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            links.append(entry.name)
        elif entry.is_dir():
            walk = walk_files(path / entry.name)
            found[entry.name] = [path / entry.name / rel for rel in walk.files
                                 if rel.lower().endswith(IMAGE_SUFFIXES)]
            links += [f"{entry.name}/{rel}" for rel in walk.links]
    return found


def preflight(config: TrainingConfig, root_path: Path | None, smoke: bool = True,
              storage: Storage | None = None) -> Preflight:
    """Checks that catch most broken jobs before they reach the GPU queue: the data folders
    resolve (with the worker's path mapping), train and val have the same non-empty class
    folders, num_classes matches, a sample of images decodes, and (with torch here) the model
    takes a couple of training steps on the CPU. Data in a Drive API root is listed there, and
    a few images per class are downloaded for the decode and training checks."""
    if config.data.archive:
        return Preflight([("data", "an archive: checked by the worker after extracting it")])
    if config.evaluate is not None:
        return _preflight_evaluation(config, root_path)
    with tempfile.TemporaryDirectory(prefix="cherry-preflight-") as sample_dir:
        return _preflight(config, root_path, smoke, storage, Path(sample_dir))


def _preflight(config: TrainingConfig, root_path: Path | None, smoke: bool,
               storage: Storage | None, sample_dir: Path) -> Preflight:
    report, problems, images, local, links = Preflight(), [], {}, {}, []
    report.checks.append(("model", check_model_name(config)))
    for name in ("train_path", "val_path"):
        raw = getattr(config.data, name)
        remote = remote_location(raw, root_path, storage) if storage is not None else None
        if remote is not None:
            drive, remote_path = remote
            counts = _remote_class_counts(drive, remote_path)
            if counts is None:
                problems.append(datachecks.missing_folder(f"data.{name}", remote_path,
                                                          under=drive.description))
                continue
            path, where = _download_sample(drive, remote_path, counts, sample_dir / name), raw
            images[name] = _class_images(path, [])
            totals = {c: len(files) for c, files in counts.items()}
        else:
            try:
                path = where = map_data_path(raw, root_path)
            except PathMappingError as e:
                problems.append(f"data.{name}: {e}")
                continue
            if not path.is_dir():
                problems.append(datachecks.missing_folder(f"data.{name}", path) +
                                " (pass --no-preflight if only the worker can see it)")
                continue
            images[name] = _class_images(path, links)
            totals = {c: len(v) for c, v in images[name].items()}
        local[name] = path
        counts_text = ", ".join(f"{c} {n}" for c, n in totals.items())
        report.checks.append((name.removesuffix("_path"),
                              f"{where}: {sum(totals.values())} images "
                              f"({counts_text or 'no class folders'})"))
        problems += [datachecks.empty_class(f"data.{name}", c)
                     for c, n in totals.items() if not n]
    if "train_path" in images:
        val = list(images["val_path"]) if "val_path" in images else None
        problems += datachecks.class_problems(list(images["train_path"]), val,
                                              config.model.num_classes)
    if problems:
        raise ConfigError(problems)
    if links:  # the worker skips them too: said here, where they can still be fixed
        report.checks.append(("links", Walk(links=links).skipped()))
    report.checks.append(("decode", _decode_sample(images)))
    if smoke:
        report.checks.append(("smoke", _smoke(config, root_path, local["train_path"],
                                              images, storage, sample_dir)))
    return report


def _remote_class_counts(storage: Storage, path: str) -> dict[str, list[str]] | None:
    """class -> image file names, from one listing per class folder."""
    if not storage.exists(path):
        return None
    return {c: sorted(n for n in storage.list_entries(f"{path}/{c}")
                      if n.lower().endswith(IMAGE_SUFFIXES))
            for c, info in sorted(storage.list_entries(path).items())
            if info.is_dir and not c.startswith(".")}


def _download_sample(storage: Storage, path: str, counts: dict[str, list[str]],
                     target: Path) -> Path:
    per_class = max(SMOKE_IMAGES_PER_CLASS, DECODE_SAMPLE // max(1, len(counts)))
    for cls, files in counts.items():
        step = max(1, len(files) // per_class)
        try:  # names from a Drive listing, where '/' and '..' are allowed
            folder = inside(target, plain_name(cls, path), storage.description)
            names = [plain_name(n, f"{path}/{cls}") for n in files[::step][:per_class]]
        except UnsafePath as e:
            raise ConfigError([str(e)]) from None
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            storage.download(f"{path}/{cls}/{name}", folder / name)
    return target


def _preflight_evaluation(config: TrainingConfig, root_path: Path | None) -> Preflight:
    report, ev = Preflight(), config.evaluate
    name = "evaluate.data_path" if ev.data_path else "data.val_path"
    try:
        path = map_data_path(ev.data_path or config.data.val_path, root_path)
        weights = weights_here(map_data_path(ev.weights, root_path)) if ev.weights else None
    except PathMappingError as e:
        raise ConfigError([f"{name}: {e}"]) from None
    if not path.is_dir():
        raise ConfigError([datachecks.missing_folder(name, path)])
    links: list[str] = []
    images = _class_images(path, links)
    report.checks.append(("data", f"{path}: {sum(map(len, images.values()))} images "
                                  f"({', '.join(f'{c} {len(v)}' for c, v in images.items())})"))
    if links:
        report.checks.append(("links", Walk(links=links).skipped()))
    if weights is not None and not weights.is_file():
        raise ConfigError([f"evaluate.weights: {weights} does not exist"])
    report.checks.append(("weights", str(weights) if weights else f"job {ev.job}'s best.pt"))
    report.checks.append(("decode", _decode_sample({name.split(".")[-1]: images})))
    return report


def _decode_sample(images: dict[str, dict[str, list[Path]]]) -> str:
    try:
        from PIL import Image
    except ImportError:
        return "not checked (no Pillow here)"
    problems, checked = [], 0
    for name, classes in images.items():
        for files in classes.values():
            step = max(1, len(files) * len(classes) // DECODE_SAMPLE)
            for path in files[::step][: max(1, DECODE_SAMPLE // len(classes))]:
                checked += 1
                try:
                    with Image.open(path) as img:
                        img.convert("RGB")
                except Exception as e:  # PIL raises many kinds for broken files
                    problems.append(f"data.{name}: {path} does not decode as an image "
                                    f"({type(e).__name__}: {e})")
    if problems:
        raise ConfigError(problems)
    return f"{checked} sampled images decode"


def _smoke(config: TrainingConfig, root_path: Path | None, train_dir: Path, images,
           storage: Storage | None, sample_dir: Path) -> str:
    if importlib.util.find_spec("torch") is None:
        return "no training steps tried (no torch here; install cherry-train[worker] for it)"
    from cherry_train.worker.errors import JobError
    from cherry_train.worker.smoke import smoke_test

    weights = config.model.pretrained
    weights_file = None
    remote = remote_location(weights, root_path, storage) \
        if isinstance(weights, str) and storage is not None else None
    if remote is not None:
        drive, remote_path = remote
        weights_file = sample_dir / "weights" / Path(weights).name
        try:
            drive.download(remote_path, weights_file)
        except FileNotFoundError:  # a finished job's final.pt that is its best.pt: best.pt
            best = best_for_final(remote_path, drive.read_text_or_none)
            if best is None or not drive.exists(best):
                raise ConfigError([f"model.pretrained: {weights} does not exist under "
                                   f"{drive.description}"]) from None
            drive.download(best, weights_file)
    elif isinstance(weights, str):
        weights_file = weights_here(map_data_path(weights, root_path))
    try:
        return smoke_test(config, train_dir, list(images["train_path"]), weights_file)
    except JobError as e:
        raise ConfigError([str(e)]) from None


def check_space(storage: Storage, config: TrainingConfig, root: str) -> str | None:
    """On a gdrive: root, a job whose files cannot fit in the Drive's free space is refused
    here, not after hours of training (a folder root's disk is this machine's, not the
    worker's: not checked). What was found, for the pre-flight report."""
    if not root.startswith("gdrive:"):
        return None
    from cherry_train.worker import space  # torch only if it is installed

    try:
        need = space.footprint(config)
    except ImportError:
        return "not checked here (no torch to count the model's parameters); the worker " \
               "checks before it starts the job"
    free = storage.free_bytes()
    why = space.shortfall(need, free)
    if why is not None:
        raise ConfigError([f"(Drive space): the job {why}"])
    if need is None or free is None:
        return "nothing to check (no quota, or nothing large stored)"
    return f"needs about {human_bytes(need)}, {human_bytes(free)} free"


def submitted_by() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def submit(queue: JobQueue, config: TrainingConfig, config_file: str) -> Manifest:
    return queue.submit(config, config_file=config_file, submitted_by=submitted_by(),
                        client_version=__version__)


def live_workers(queue: JobQueue) -> list[str]:
    return [w.worker_id for w in queue.workers()
            if w.state != "stopped" and age_seconds(queue.clock, w.at) < WORKER_FRESH_SECONDS]
