"""The `cherry` command as users run it: exit codes, stdout/stderr, and nothing written on error."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SEED_YAML

from cherry_train.cli import main


def write_config(tmp_path, data: dict | str, name="exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_submit_prints_root_and_job_id_last(tmp_path, root_with_data, tiny_config, capsys):
    cfg = write_config(tmp_path, tiny_config)
    assert main(["submit", str(cfg), "--root", str(root_with_data)]) == 0
    out, err = capsys.readouterr()
    job_id = out.strip().splitlines()[-1]
    assert f"root: {root_with_data} (from --root)" in out
    assert "pre-flight:" in out and "96 images (defect 48, good 48)" in out
    assert "32 sampled images decode" in out and "2 training steps of resnet18" in out
    assert (root_with_data / "queue" / f"{job_id}.json").is_file()
    assert "no worker has written a heartbeat" in err


def test_submit_overrides_name_and_priority(tmp_path, root_with_data, tiny_config, capsys):
    cfg = write_config(tmp_path, tiny_config)
    assert main(["submit", str(cfg), "--root", str(root_with_data), "--name", "lr-sweep-1",
                 "--priority", "7", "--no-preflight"]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert "-lr-sweep-1-" in job_id
    manifest = json.loads((root_with_data / "queue" / f"{job_id}.json").read_text())
    assert manifest["priority"] == 7 and manifest["config"]["priority"] == 7


def test_submit_name_defaults_to_the_file_stem(tmp_path, root_with_data, tiny_config, capsys):
    del tiny_config["name"]
    cfg = write_config(tmp_path, tiny_config, name="ResNet Baseline.yaml")
    assert main(["submit", str(cfg), "--root", str(root_with_data), "--no-preflight"]) == 0
    assert "-resnet-baseline-" in capsys.readouterr().out.strip().splitlines()[-1]


BAD_FILES = {
    "missing": None,
    "empty": "",
    "not yaml": "model: {name: [\n",
    "a list": "- 1\n- 2\n",
    "a typo": SEED_YAML.replace("epochs", "epoch"),
    "bad values": SEED_YAML.replace("batch_size: 32", "batch_size: -1")
                           .replace("adam", "lion"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_config_exits_2_with_field_lines_and_writes_nothing(tmp_path, case, capsys):
    root = tmp_path / "root"
    text = BAD_FILES[case]
    cfg = tmp_path / "bad.yaml" if text is None else write_config(tmp_path, text, "bad.yaml")
    assert main(["submit", str(cfg), "--root", str(root), "--no-preflight"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    for line in err.strip().splitlines():
        field, _, problem = line.partition(": ")
        assert field and problem, line
    if case == "bad values":
        assert {line.split(":")[0] for line in err.splitlines()} == \
            {"training.batch_size", "training.optimizer"}
    assert not root.exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["data"].update(val_path="data/missing"), "data.val_path: folder"),
    (lambda c: c["model"].update(num_classes=5), "model.num_classes: is 5, but"),
    (lambda c: c["model"].update(name="resnet5"), "did you mean resnet50"),
])
def test_preflight_problems_exit_2_and_queue_nothing(tmp_path, root_with_data, tiny_config,
                                                     change, message, capsys):
    change(tiny_config)
    cfg = write_config(tmp_path, tiny_config)
    assert main(["submit", str(cfg), "--root", str(root_with_data)]) == 2
    assert message in capsys.readouterr().err
    assert not (root_with_data / "queue").exists()


def test_colab_paths_map_to_my_drive_off_colab(tmp_path, cherry_images, monkeypatch, capsys):
    my_drive = tmp_path / "My Drive"
    (my_drive / "traina").mkdir(parents=True)
    (my_drive / "traina" / "data").symlink_to(cherry_images, target_is_directory=True)
    monkeypatch.setenv("CHERRY_MYDRIVE", str(my_drive))
    cfg = write_config(tmp_path, SEED_YAML.replace("pretrained: true", "pretrained: false"))
    assert main(["submit", str(cfg), "--root", str(tmp_path / "q")]) == 0
    assert f"{my_drive}/traina/data/train" in capsys.readouterr().out


def test_status_json_lists_jobs_with_state(tmp_path, root_with_data, tiny_config, capsys):
    cfg = write_config(tmp_path, tiny_config)
    main(["submit", str(cfg), "--root", str(root_with_data), "--no-preflight"])
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["status", "--root", str(root_with_data), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["job_id"], r["state"], r["stalled"]) for r in rows] == [(job_id, "queued", False)]
    assert main(["status", "--root", str(root_with_data)]) == 0
    table = capsys.readouterr().out
    assert job_id in table and "queued" in table and "workers: none" in table


def test_root_resolution_order(tmp_path, monkeypatch, capsys):
    saved, env, flag = tmp_path / "saved", tmp_path / "env", tmp_path / "flag"
    env.mkdir()
    flag.mkdir()
    assert main(["init", str(saved)]) == 0
    capsys.readouterr()
    assert main(["status"]) == 0
    assert f"root: {saved}" in capsys.readouterr().out
    monkeypatch.setenv("CHERRY_ROOT", str(env))
    main(["status"])
    assert f"root: {env}" in capsys.readouterr().out
    main(["status", "--root", str(flag)])
    assert f"root: {flag}" in capsys.readouterr().out


def test_local_default_root_comes_with_a_notice(capsys):
    assert main(["status"]) == 0
    assert "note: no root configured" in capsys.readouterr().err


def test_init_detects_drive_for_desktop(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHERRY_MYDRIVE", str(tmp_path / "My Drive"))
    (tmp_path / "My Drive").mkdir()
    assert main(["init"]) == 0
    assert f"default root: {tmp_path / 'My Drive' / 'traina'}" in capsys.readouterr().out


def test_init_without_drive_explains(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["init"]) == 2
    assert "cherry init PATH" in capsys.readouterr().err


def test_schema_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "cherry-train training config"


def test_gdrive_root_without_credentials_is_one_clear_line(tmp_path, tiny_config, capsys):
    cfg = write_config(tmp_path, tiny_config)
    assert main(["submit", str(cfg), "--root", "gdrive:traina", "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Drive credentials") and err.count("\n") == 1


def test_bad_worker_id_is_refused(tmp_path, capsys):
    for bad in ("no spaces!", "w1\n"):  # a final newline would end up in file names
        assert main(["worker", "--root", str(tmp_path), "--worker-id", bad]) == 2
        assert "--worker-id" in capsys.readouterr().err


@pytest.mark.parametrize(("gpus", "says"), [("x", "expected a number of GPUs or 'all', got 'x'"),
                                             ("0", "must be at least 1")])
def test_a_bad_gpu_count_is_refused_in_words(tmp_path, capsys, gpus, says):
    with pytest.raises(SystemExit) as exited:
        main(["worker", "--root", str(tmp_path), "--gpus", gpus])
    assert exited.value.code == 2 and f"--gpus: {says}" in capsys.readouterr().err


@pytest.mark.slow
def test_reduced_demo_end_to_end_in_a_subprocess(tmp_path):
    """As the quick start runs it: `.venv/bin/cherry demo` with the venv not on PATH; the next
    steps it prints work when typed as printed, also under a root with a space in its path (a
    macOS demo root is under "Application Support")."""
    bin_dir = Path(sys.executable).parent
    exe = shutil.which("cherry", path=str(bin_dir))
    assert exe, "console scripts are not installed: pip install -e '.[dev]'"
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and shutil.which("cherry", path=p) is None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path}
    proc = subprocess.run(
        [exe, "demo", "--root", str(tmp_path / "my demo"),
         "--train-images", "64", "--val-images", "32", "--epochs", "1", "--image-size", "32",
         "--no-progress"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "succeeded" in proc.stdout and "best      val accuracy" in proc.stdout
    demo_root = str(tmp_path / "my demo")
    quoted = shlex.quote(demo_root)
    steps = [x.strip() for x in proc.stdout.split("next:")[1].splitlines()
             if x.strip() and not x.strip().startswith("#")]
    assert steps[0] == f"{exe} status --root {quoted}"
    assert f"{exe} tensorboard --root {quoted}" in steps
    assert any(x.startswith(f"{exe} submit ") for x in steps)
    fetch = steps[1].split(" fetch ")[1].split()[0]
    assert main(["fetch", fetch, "--root", demo_root, "--dest", str(tmp_path / "f")]) == 0
    curves = proc.stdout.split("curves    ")[1].splitlines()[0]
    assert Path(curves).read_bytes()[:4] == b"\x89PNG"
    for label in ("onnx      ", "events    "):  # what README's quick start shows
        line = proc.stdout.split(label)[1].splitlines()[0]
        assert Path(line.split(" (checked against")[0]).exists(), label
    # Typed as printed: the demo's job is visible to `cherry status` like any other.
    status = subprocess.run(steps[0] + " --json", shell=True, capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)[0]["state"] == "succeeded"
    cache = [Path(p) for p in shlex.split(steps[-1])[3:]]  # rm -r ROOT, then the data cache
    assert len(cache) == 2 and all(p.is_dir() for p in cache)
    subprocess.run(steps[-1], shell=True, check=True, env=env, cwd=tmp_path)
    assert not Path(demo_root).exists() and not any(p.exists() for p in cache)


def test_printed_commands_name_the_cherry_the_user_ran(tmp_path):
    from cherry_train.cli.common import cherry_command

    venv_bin = tmp_path / "my venv" / "bin"
    venv_bin.mkdir(parents=True)
    script, python = venv_bin / "cherry", venv_bin / "python"
    script.write_text("#!/bin/sh\n")
    assert cherry_command(str(script), str(python), which=lambda _: None) == f"'{script}'"
    assert cherry_command(str(script), str(python), which=lambda _: str(script)) == "cherry"
    assert cherry_command(str(script), str(python),
                          which=lambda _: "/usr/bin/cherry") == f"'{script}'"
    # python -m cherry_train: the script beside that Python, else python -m again
    assert cherry_command("/x/cherry_train/__main__.py", str(python),
                          which=lambda _: None) == f"'{script}'"
    script.unlink()
    assert cherry_command("/x/cherry_train/__main__.py", str(python),
                          which=lambda _: None) == f"'{python}' -m cherry_train"


@pytest.mark.slow
def test_console_scripts_are_installed_aliases(tmp_path, tiny_config):
    bin_dir = Path(sys.executable).parent  # the venv's scripts, whether or not it is on PATH
    exe = shutil.which("cherry-submit", path=str(bin_dir)) or shutil.which("cherry-submit")
    assert exe, "console scripts are not installed: pip install -e '.[dev]'"
    cfg = write_config(tmp_path, tiny_config)
    proc = subprocess.run([exe, str(cfg), "--root", str(tmp_path / "r"), "--no-preflight"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "queue" / f"{proc.stdout.strip().splitlines()[-1]}.json").is_file()
    worker = shutil.which("cherry-worker", path=str(bin_dir)) or shutil.which("cherry-worker")
    proc = subprocess.run([worker, "--help"], capture_output=True,
                          text=True, timeout=60)
    assert "--worker-id" in proc.stdout


def test_worker_refuses_a_root_that_does_not_exist(tmp_path, capsys):
    assert main(["worker", "--root", str(tmp_path / "typo"), "--exit-when-idle"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["cancel", "abcd"],
                                     ["retry", "abcd"], ["fetch", "abcd"], ["watch", "abcd"]])
def test_reading_commands_say_a_mistyped_root_does_not_exist(tmp_path, capsys, command):
    assert main([*command, "--root", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert "typo does not exist (from --root)" in err and "pass --root" in err


def test_model_name_is_checked_even_without_preflight(tmp_path, tiny_config, capsys):
    tiny_config["model"]["name"] = "resnet5"
    cfg = write_config(tmp_path, tiny_config)
    assert main(["submit", str(cfg), "--root", str(tmp_path / "r"), "--no-preflight"]) == 2
    assert "did you mean resnet50" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cancel_a_queued_job_by_its_short_id(tmp_path, tiny_config, capsys):
    cfg = write_config(tmp_path, tiny_config)
    root = str(tmp_path / "r")
    main(["submit", str(cfg), "--root", root, "--no-preflight"])
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["cancel", job_id[-1:], "--root", root]) == 2  # unique, but one char is a guess
    assert "give at least 4 characters" in capsys.readouterr().err
    assert json.loads((main(["status", "--root", root, "--json"]), capsys.readouterr().out)[1]
                      )[0]["state"] == "queued"
    assert main(["cancel", job_id[-4:], "--root", root]) == 0
    assert "it will not start" in capsys.readouterr().out
    main(["status", "--root", root, "--json"])
    assert json.loads(capsys.readouterr().out)[0]["state"] == "cancelled"
    assert (tmp_path / "r" / "control" / f"{job_id}.cancel").is_file()
    assert main(["retry", job_id[-4:], "--root", root]) == 0  # cancelled, so retryable
    assert "queued " + job_id + " again" in capsys.readouterr().out
    main(["status", "--root", root, "--json"])
    assert json.loads(capsys.readouterr().out)[0]["state"] == "queued"
    assert main(["cancel", "nope", "--root", root]) == 2
    assert "no job 'nope'" in capsys.readouterr().err


def _own_data(tmp_path, cherry_images) -> Path:
    root = tmp_path / "own"
    shutil.copytree(cherry_images, root / "data")
    return root


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda d: (d / "val" / "good").rename(d / "val" / "fine"),
     "data.val_path: class folders ['defect', 'fine'] differ"),
    (lambda d: sorted((d / "train" / "good").iterdir())[0].write_bytes(b"\xff\xd8 not a jpeg"),
     "does not decode as an image"),
    (lambda d: [p.unlink() for p in (d / "val" / "defect").iterdir()],
     "data.val_path: class folder 'defect' has no images"),
])
def test_preflight_catches_broken_data(tmp_path, cherry_images, tiny_config, breakage, message,
                                       capsys):
    root = _own_data(tmp_path, cherry_images)
    breakage(root / "data")
    cfg = write_config(tmp_path, tiny_config)
    assert main(["submit", str(cfg), "--root", str(root)]) == 2
    assert message in capsys.readouterr().err
    assert not (root / "queue").exists()


@pytest.mark.parametrize("model", [
    "inception_v3",  # needs at least 75 px: a RuntimeError deep inside
    "vit_b_16",  # needs exactly 224: an AssertionError ("Wrong image height!")
])
def test_preflight_smoke_test_catches_a_model_that_cannot_run_at_that_size(
        tmp_path, root_with_data, tiny_config, capsys, model):
    tiny_config["model"]["name"] = model
    cfg = write_config(tmp_path, tiny_config)
    assert main(["submit", str(cfg), "--root", str(root_with_data)]) == 2
    assert f"data.image_size: {model} cannot train at 32 px" in capsys.readouterr().err
    assert not (root_with_data / "queue").exists()


def test_preflight_of_an_evaluation_checks_its_data_and_weights(tmp_path, root_with_data,
                                                               capsys):
    cfg = write_config(tmp_path, {
        "mode": "evaluation", "model": {"name": "resnet18", "num_classes": 2},
        "data": {"val_path": "data/val"}, "evaluate": {"weights": "missing.pt"}})
    assert main(["submit", str(cfg), "--root", str(root_with_data)]) == 2
    assert "evaluate.weights:" in capsys.readouterr().err
    (root_with_data / "missing.pt").write_bytes(b"x")
    assert main(["submit", str(cfg), "--root", str(root_with_data)]) == 0
    assert "32 images (defect 16, good 16)" in capsys.readouterr().out


BLOCK_HEAVY = """
import importlib.abc, importlib.util, sys
HEAVY = {"torch", "torchvision", "numpy", "PIL", "matplotlib"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{name} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in HEAVY \\
    else real_find_spec(name, *a)
from cherry_train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_client_runs_without_torch_numpy_pillow_or_matplotlib(tmp_path, root_with_data,
                                                                  tiny_config):
    cfg = write_config(tmp_path, tiny_config)

    def cherry(*args):
        return subprocess.run([sys.executable, "-c", BLOCK_HEAVY, *args], capture_output=True,
                              text=True, timeout=60)

    submit = cherry("submit", str(cfg), "--root", str(root_with_data))
    assert submit.returncode == 0, submit.stderr
    assert "not checked (no torchvision here" in submit.stdout
    assert "no training steps tried (no torch here" in submit.stdout
    job_id = submit.stdout.strip().splitlines()[-1]
    for args in (("status", "--json"), ("cancel", job_id), ("watch", job_id, "--no-progress")):
        proc = cherry(*args, "--root", str(root_with_data))
        assert proc.returncode in (0, 3), (args, proc.stderr)
    worker = cherry("worker", "--root", str(root_with_data))
    assert worker.returncode == 2 and "needs torch" in worker.stderr


def test_confirm_uploads_outside_my_drive_is_refused_clearly(tmp_path, capsys):
    assert main(["worker", "--root", str(tmp_path), "--confirm-uploads",
                 "--exit-when-idle"]) == 2
    assert "--confirm-uploads" in capsys.readouterr().err


def test_every_option_of_every_command_says_what_it_does():
    from cherry_train.cli import build_parser

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in parsers(build_parser())
               for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert missing == []


def test_a_bad_name_is_answered_in_words(tmp_path, tiny_config, capsys):
    from cherry_train.schemas.config import NAME_PATTERN
    from cherry_train.schemas.errors import PATTERN_WORDS

    assert NAME_PATTERN in PATTERN_WORDS
    cfg = write_config(tmp_path, tiny_config)
    assert main(["submit", str(cfg), "--root", str(tmp_path / "r"), "--name", "bad name!",
                 "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert "letters, digits, '.', '_' or '-'" in err and "[A-Za-z" not in err


@pytest.mark.parametrize("command", [["status"], ["status", "--json"],
                                     ["compare", "pipe-*", "--out", "{tmp}/c.png"]])
def test_output_into_a_reader_that_closed_early_ends_quietly(tmp_path, tiny_config, command):
    """`cherry status | head -3` with head gone before status writes: no BrokenPipeError
    traceback (issue 28), the exit code a shell shows for SIGPIPE."""
    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import validate_config
    from cherry_train.storage import LocalStorage

    queue = JobQueue(LocalStorage(tmp_path / "r"))
    for name in ("pipe-a", "pipe-b"):
        queue.submit(validate_config({**tiny_config, "name": name,
                                      "seed": len(name) + ord(name[-1])}))
    reader, writer = os.pipe()
    os.close(reader)  # the reader has left already: the first write meets a closed pipe
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cherry_train", *[c.format(tmp=tmp_path) for c in command],
             "--root", str(tmp_path / "r")], stdout=writer, stderr=subprocess.PIPE, text=True,
            timeout=120)
    finally:
        os.close(writer)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141, proc.stderr


def test_a_broken_pipe_that_is_not_stdout_stays_a_bug(monkeypatch, capsys):
    """Only a reader that left is answered quietly: a broken connection elsewhere (a socket, a
    loader process) shows its traceback."""
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("cherry_train.cli.parser.cmd_schema", broken)
    with pytest.raises(BrokenPipeError):
        main(["schema"])


def test_worker_on_a_skypilot_vm_without_a_root_is_refused(tmp_path, capsys, monkeypatch):
    """The local default root on a spot VM would be trained into and lost with the VM."""
    monkeypatch.setenv("SKYPILOT_TASK_ID", "sky-managed-2026_cherry-worker-1_1-0")
    assert main(["worker", "--exit-when-idle"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SkyPilot" in err and "CHERRY_ROOT" in err
    from cherry_train.places import default_local_root

    assert not default_local_root().exists()
    # With a root it starts as anywhere else.
    monkeypatch.setenv("CHERRY_ROOT", str(tmp_path))
    assert main(["worker", "--exit-when-idle", "--worker-id", "sky-1"]) == 0
