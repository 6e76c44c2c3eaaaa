"""The key that signs stored compiled kernels: where a worker finds it, what it refuses, and the
MAC itself (torch-free; the worker's use of it is in test_compiling.py)."""

from __future__ import annotations

import pytest

from cherry_train.cli import main
from cherry_train.worker.checkpoints.kernelseal import (
    KernelKeyError,
    KernelSeal,
    Unverified,
    load_seal,
)

KEY = "k" * 32
BLOB = b"cherry-train compiled kernels\n{}\n" + bytes(range(256)) * 4


def test_a_signed_blob_verifies_for_its_job_only():
    seal = KernelSeal(KEY.encode())
    signed = seal.sign(BLOB, "job-a")
    at = signed.index(b"\n") + 1  # the MAC's first character
    assert signed != BLOB and seal.verify(signed, "job-a") == BLOB
    assert KernelSeal(KEY.encode()).verify(signed, "job-a") == BLOB  # another worker, same key
    refused = {
        "another job": (signed, "job-b"),
        "a byte changed": (signed[:-1] + bytes([signed[-1] ^ 1]), "job-a"),
        "the MAC changed": (signed[:at] + (b"1" if signed[at] == ord("0") else b"0")
                            + signed[at + 1:], "job-a"),
        "another key": (KernelSeal(b"x" * 32).sign(BLOB, "job-a"), "job-a"),
        "not signed": (BLOB, "job-a"),
        "cut short": (signed[:40], "job-a"),
        "empty": (b"", "job-a"),
    }
    for case, (data, job_id) in refused.items():
        with pytest.raises(Unverified):
            seal.verify(data, job_id)
            pytest.fail(case)


def test_a_job_id_and_blob_cannot_be_split_another_way():
    seal = KernelSeal(KEY.encode())
    # "job-a" + "1..." and "job-a1" + "..." are different inputs to the MAC.
    assert seal.sign(b"1" + BLOB, "job-a")[-len(BLOB):] == BLOB
    with pytest.raises(Unverified):
        seal.verify(seal.sign(b"1" + BLOB, "job-a"), "job-a1")


def test_without_a_key_nothing_verifies():
    with pytest.raises(Unverified, match="no kernel key"):
        KernelSeal(None).verify(KernelSeal(KEY.encode()).sign(BLOB, "j"), "j")


def test_where_the_key_comes_from(tmp_path, monkeypatch):
    from cherry_train import places

    assert not load_seal(None, tmp_path / "root").enabled  # nothing given: off
    default = places.config_dir() / "kernel-key"
    default.parent.mkdir(parents=True)
    default.write_text("d" * 40 + "\n")
    assert load_seal(None, None).key == b"d" * 40  # the config folder's file
    monkeypatch.setenv("CHERRY_KERNEL_KEY", " " + "e" * 32 + " ")
    assert load_seal(None, None).key == b"e" * 32  # the variable, before the file
    flag = tmp_path / "key"
    flag.write_text("f" * 32)
    assert load_seal(str(flag), None).key == b"f" * 32  # the flag, before both
    monkeypatch.setenv("CHERRY_STORED_KERNELS", "0")  # off, whatever key there is
    off = load_seal(str(flag), None)
    assert not off.enabled and off.why_off == "CHERRY_STORED_KERNELS=0"


def test_a_weak_key_or_one_in_the_queue_folder_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    inside = root / "sub" / "kernel-key"
    inside.write_text("g" * 32)
    with pytest.raises(KernelKeyError, match="inside the queue folder"):
        load_seal(str(inside), root)
    link = tmp_path / "innocent-looking"
    link.symlink_to(inside)  # a link into the folder is the folder
    with pytest.raises(KernelKeyError, match="inside the queue folder"):
        load_seal(str(link), root)
    with pytest.raises(KernelKeyError, match="no such|No such"):
        load_seal(str(tmp_path / "missing"), root)
    monkeypatch.setenv("CHERRY_KERNEL_KEY", "short")
    with pytest.raises(KernelKeyError, match=r"\$CHERRY_KERNEL_KEY: the kernel key has 5 "
                                             r"characters; use at least 32"):
        load_seal(None, root)


def test_the_worker_refuses_a_bad_key_in_one_line(tmp_path, capsys):
    short = tmp_path / "key"
    short.write_text("too short")
    (tmp_path / "root").mkdir()
    assert main(["worker", "--root", str(tmp_path / "root"), "--kernel-key-file", str(short),
                 "--exit-when-idle"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --kernel-key-file {short}: the kernel key has 9 characters")
    assert err.count("\n") == 1
