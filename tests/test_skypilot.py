"""The SkyPilot task file (deploy/skypilot/worker.yaml): what its run script does on a VM, run
here by bash with a stand-in `cherry`, and, with the `fleet` extra, what SkyPilot's own parser
makes of the file. The worker under preemption (SIGTERM to its group) is tested elsewhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cherry_train.jobqueue.ids import WORKER_ID_RE

TASK_FILE = Path(__file__).resolve().parent.parent / "deploy" / "skypilot" / "worker.yaml"
TOKEN = json.dumps({"token": "ya29.secret", "refresh_token": "1//refresh", "client_id": "c"})
EXIT_GPU_FAILED = 75  # cherry_train.worker.loop.EXIT_GPU_FAILED, without importing torch here

# A stand-in for `cherry` on the VM: records how it was started, exits as told.
FAKE_CHERRY = """#!{python}
import os, signal, sys, time
signals = []
if os.environ.get("FAKE_WAIT"):  # a worker at work: a signal stops it (0), a second at once (130)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130) if signals else signals.append(1))
token = os.path.join(os.environ["CHERRY_CONFIG_DIR"], "drive-token.json")
with open(os.environ["FAKE_OUT"], "w") as out:
    print(*sys.argv[1:], sep="\\n", file=out)
    print("--env--", file=out)
    for name in sorted(os.environ):
        if name.startswith(("CHERRY_", "SKYPILOT_")):
            print(f"{{name}}={{os.environ[name]}}", file=out)
    print("--token--", file=out)
    if os.path.exists(token):
        print(oct(os.stat(token).st_mode & 0o777)[2:], file=out)
        print(open(token).read(), file=out)
if os.environ.get("FAKE_WAIT"):
    for _ in range(1200):
        time.sleep(0.1)
        if signals:  # the checkpoint and the hand-back take a moment
            time.sleep(0.5)
            break
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def task_config() -> dict:
    return yaml.safe_load(TASK_FILE.read_text())


def script_env(tmp_path: Path, env: dict[str, str], exit_code: int = 0) -> dict[str, str]:
    """The VM's environment for the run section: the task's envs and secrets exported, and a
    stand-in `cherry` first on PATH that writes what it was given to FAKE_OUT."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    fake = bin_dir / "cherry"
    fake.write_text(FAKE_CHERRY.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "cherry-was-run.txt"
    out.unlink(missing_ok=True)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "FAKE_OUT": str(out),
            "FAKE_EXIT": str(exit_code), **env}


def run_script(tmp_path: Path, run: str, env: dict[str, str], exit_code: int = 0):
    """The run section as SkyPilot runs it (bash), with `cherry` replaced: (the completed
    process, what `cherry` was given or None)."""
    full_env = script_env(tmp_path, env, exit_code)
    proc = subprocess.run(["bash", "-c", run], env=full_env, capture_output=True, text=True,
                          timeout=60)
    out = Path(full_env["FAKE_OUT"])
    return proc, (out.read_text() if out.exists() else None)


def envs_of(config: dict, **overrides: str) -> dict[str, str]:
    envs = {k: v for k, v in config["envs"].items() if v is not None}
    return {**envs, **overrides}


def test_no_root_is_one_line_and_exit_2_and_no_worker(tmp_path):
    config = task_config()
    for root in (None, ""):
        env = envs_of(config, CHERRY_DRIVE_TOKEN_JSON=TOKEN)
        if root is not None:
            env["CHERRY_ROOT"] = root
        proc, started = run_script(tmp_path, config["run"], env)
        assert proc.returncode == 2, proc.stderr
        assert started is None  # nothing ran, nothing was written into a local folder
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "CHERRY_ROOT" in lines[0] and "--env CHERRY_ROOT=" in lines[0]


def test_gdrive_root_without_token_is_one_line_and_exit_2(tmp_path):
    config = task_config()
    proc, started = run_script(tmp_path, config["run"],
                               envs_of(config, CHERRY_ROOT="gdrive:traina"))
    assert proc.returncode == 2 and started is None
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--secret CHERRY_DRIVE_TOKEN_JSON" in lines[0]


def vm_env(config, task_id="sky-managed-2026_cherry-worker-1_1-0") -> dict[str, str]:
    return envs_of(config, CHERRY_ROOT="gdrive:traina", CHERRY_DRIVE_TOKEN_JSON=TOKEN,
                   SKYPILOT_TASK_ID=task_id, SKYPILOT_MANAGED_JOB_ID="7",
                   SKYPILOT_NODE_RANK="0")


def _worker_run(tmp_path, config, run, task_id="sky-managed-2026_cherry-worker-1_1-0",
                exit_code=0):
    proc, started = run_script(tmp_path, run, vm_env(config, task_id), exit_code)
    assert started is not None, proc.stderr
    argv, rest = started.split("--env--\n")
    env_lines, token = rest.split("--token--\n")
    return proc, argv.splitlines(), env_lines.splitlines(), token.splitlines()


def check_worker_run(tmp_path, config, run):
    proc, argv, env, token = _worker_run(tmp_path, config, run)
    assert proc.returncode == 0, proc.stderr
    assert argv[:3] == ["worker", "--root", "gdrive:traina"]
    assert argv[argv.index("--idle-shutdown") + 1] == config["envs"]["CHERRY_IDLE_MINUTES"]
    worker_id = argv[argv.index("--worker-id") + 1]
    assert WORKER_ID_RE.match(worker_id) and worker_id.startswith("sky-7-"), worker_id
    # The token is a file only its owner reads, and the worker's environment does not hold it.
    assert token == ["600", TOKEN]
    assert not any(line.startswith("CHERRY_DRIVE_TOKEN_JSON=") for line in env)
    assert f"CHERRY_CONFIG_DIR={tmp_path / 'home' / '.config' / 'cherry-train'}" in env
    # Stable across a recovery (same task id), apart across managed jobs (another task id).
    _, again, _, _ = _worker_run(tmp_path, config, run)
    _, other, _, _ = _worker_run(tmp_path, config, run, task_id="sky-managed-2026_cherry-2_2-0")
    assert again[again.index("--worker-id") + 1] == worker_id
    assert other[other.index("--worker-id") + 1] != worker_id
    # The worker's exit code is the job's: 75 reaches SkyPilot's recover_on_exit_codes.
    proc, _, _, _ = _worker_run(tmp_path, config, run, exit_code=EXIT_GPU_FAILED)
    assert proc.returncode == EXIT_GPU_FAILED


def test_run_script_starts_the_worker_with_root_id_and_private_token(tmp_path):
    config = task_config()
    check_worker_run(tmp_path, config, config["run"])


def test_a_worker_stopped_by_a_signal_is_not_done(tmp_path):
    """A preemption's shutdown signals every process: the worker hands its job back and exits
    0. The task must not: SkyPilot would end the managed job as done and bring no worker back.
    It exits 143 (recovered), and the worker got one signal, not a second from the shell."""
    env = script_env(tmp_path, {**vm_env(task_config()), "FAKE_WAIT": "1"})
    proc = subprocess.Popen(["bash", "-c", task_config()["run"]], env=env,
                            start_new_session=True, stderr=subprocess.PIPE, text=True)
    out = Path(env["FAKE_OUT"])
    deadline = time.monotonic() + 60
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists(), proc.stderr.read() if proc.poll() is not None else "no start"
    os.killpg(proc.pid, signal.SIGTERM)  # bash and the worker each get it, as on a VM
    assert proc.wait(timeout=60) == 143


def test_a_token_file_left_on_the_vm_is_replaced_private(tmp_path):
    """A recovered VM may keep its home: an old token there, readable by all, is not kept."""
    old = tmp_path / "home" / ".config" / "cherry-train" / "drive-token.json"
    old.parent.mkdir(parents=True)
    old.write_text("old")
    old.chmod(0o644)
    _, _, _, token = _worker_run(tmp_path, task_config(), task_config()["run"])
    assert token == ["600", TOKEN]


def test_task_file_asks_for_root_and_token_at_launch_and_maps_exit_codes():
    config = task_config()
    # Required at launch, never written in the file.
    assert config["envs"]["CHERRY_ROOT"] is None
    assert config["secrets"] == {"CHERRY_DRIVE_TOKEN_JSON": None}
    assert "CHERRY_DRIVE_TOKEN_JSON" not in config["envs"]
    assert config["resources"]["use_spot"] is True
    assert config["num_nodes"] == 1
    assert config["resources"]["job_recovery"] == {
        "strategy": "EAGER_NEXT_REGION", "recover_on_exit_codes": [EXIT_GPU_FAILED, 130, 143],
        "max_restarts_on_errors": 0}


def test_gpu_failed_exit_code_is_the_workers():
    from cherry_train.worker.loop import EXIT_GPU_FAILED as worker_code

    assert worker_code == EXIT_GPU_FAILED


def test_skypilot_parses_the_task_file(tmp_path):
    """SkyPilot's own parser (the `fleet` extra): the file is a valid task; without a root it
    refuses to launch; the run script it would send starts the worker as above."""
    sky = pytest.importorskip("sky")
    from sky.utils import yaml_utils

    with pytest.raises(ValueError, match="CHERRY_ROOT"):
        sky.Task.from_yaml(str(TASK_FILE))
    # As `sky jobs launch ... --env CHERRY_ROOT=... --secret CHERRY_DRIVE_TOKEN_JSON` does.
    task = sky.Task.from_yaml_config(
        yaml_utils.read_yaml(str(TASK_FILE)), env_overrides=[("CHERRY_ROOT", "gdrive:traina")],
        secrets_overrides=[("CHERRY_DRIVE_TOKEN_JSON", TOKEN)])
    assert task.envs["CHERRY_ROOT"] == "gdrive:traina"
    assert "CHERRY_DRIVE_TOKEN_JSON" not in task.envs
    secrets = {k: v.get_secret_value() for k, v in task.secrets.items()}
    assert secrets == {"CHERRY_DRIVE_TOKEN_JSON": TOKEN}
    assert task.num_nodes == 1
    assert {r.use_spot for r in task.resources} == {True}
    assert {json.dumps(r.job_recovery, sort_keys=True) for r in task.resources} == {json.dumps(
        task_config()["resources"]["job_recovery"], sort_keys=True)}
    check_worker_run(tmp_path, task_config(), task.run)


def test_task_file_holds_no_token():
    # The file is committed and synced to every VM: a token pasted into it would leak.
    text = TASK_FILE.read_text()
    assert "ya29." not in text and '"refresh_token"' not in text
