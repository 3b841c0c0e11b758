"""Atomic writers: a failed write leaves the earlier file intact and no temporary file behind."""

from __future__ import annotations

import errno
import gzip
import json
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.engines import checkpoint as checkpoint_module
from pipeline.engines.checkpoint import AtomicCheckpointSaver, BackgroundWriter, save_checkpoint
from pipeline.io import WriteError, atomic_save_nifti, atomic_write_json, parallel_gzip


def test_failed_checkpoint_save_keeps_the_previous_file(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    path = save_checkpoint({"model": net}, tmp_path / "last.pt")
    before = path.read_bytes()

    def crash_mid_write(self, data):
        with open(self, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", crash_mid_write)
    with pytest.raises(WriteError, match="last.pt: No space left on device; the previous last.pt is intact"):
        save_checkpoint({"model": torch.nn.Linear(2, 2)}, path)
    assert path.read_bytes() == before, "the earlier checkpoint is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temporary file left behind"


def test_identical_weights_give_identical_checkpoint_files(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    first = save_checkpoint({"model": net}, tmp_path / "a" / "model.pt").read_bytes()
    second = save_checkpoint({"model": net}, tmp_path / "b" / "other_name.pt").read_bytes()
    assert first == second, "the file's bytes do not depend on its (temporary) name"
    with torch.no_grad():
        net.bias.add_(1.0)
    assert save_checkpoint({"model": net}, tmp_path / "c.pt").read_bytes() != first, "negative control"


def test_background_checkpoint_holds_the_state_of_when_it_was_taken(tmp_path, monkeypatch):
    """The saver copies the state before the writer thread runs: a write held back until the network has changed
    still writes the weights of the epoch end."""
    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(tmp_path, net, torch.optim.SGD(net.parameters(), 0.1))
    released, real_write = threading.Event(), checkpoint_module.write_state

    def held_write(state, path):
        assert released.wait(10)
        return real_write(state, path)

    monkeypatch.setattr(checkpoint_module, "write_state", held_write)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    saver._save(saver.weights, saver.best_path)
    with torch.no_grad():
        net.weight.fill_(0.0)  # the next epoch changes the weights while the write is pending
    released.set()
    saver.writer.wait()
    saved = torch.load(saver.best_path, weights_only=True)["model"]
    assert not torch.equal(expected["weight"], net.weight), "negative control: the weights did change"
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value)


def test_background_write_error_is_raised_in_the_training_thread(tmp_path):
    writer = BackgroundWriter()

    def fail():
        raise WriteError("cannot write last.pt: No space left on device")

    written = []
    writer.submit(fail)
    writer.submit(written.append, "after")
    with pytest.raises(WriteError, match="No space left"):
        writer.wait()
    assert written == ["after"], "later writes still ran"
    writer.wait()  # raised once, then cleared


def test_unwritable_output_folder_is_named(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not_a_folder/out/metrics.json.*writable output folder"):
        atomic_write_json({"a": 1}, blocker / "out" / "metrics.json")


def test_json_is_complete_and_readable(tmp_path):
    path = atomic_write_json({"values": list(range(5))}, tmp_path / "m.json")
    assert json.loads(path.read_text()) == {"values": [0, 1, 2, 3, 4]}


@pytest.mark.parametrize("size, workers", [(0, 2), (1000, 2), (5_000_000, 3), (5_000_000, 1)])
def test_parallel_gzip_is_one_standard_gzip_member(size, workers):
    rng = np.random.default_rng(size)
    data = (rng.random(size // 4) * (rng.random(size // 4) > 0.5)).astype(np.float32).tobytes()
    compressed = parallel_gzip(data, workers=workers)
    assert gzip.decompress(compressed) == data
    decompressor = zlib.decompressobj(31)  # exactly one member: nothing left after its end
    assert decompressor.decompress(compressed) == data and decompressor.eof and decompressor.unused_data == b""
    if size:
        assert len(compressed) < len(data)


@pytest.mark.parametrize("name", ["map.nii.gz", "map.nii"])
def test_nifti_round_trips(tmp_path, name):
    volume = np.random.default_rng(0).random((70, 60, 50)).astype(np.float32)
    affine = np.diag([-1.0, 1.25, 2.0, 1.0])
    path = atomic_save_nifti(nib.Nifti1Image(volume, affine), tmp_path / name)
    loaded = nib.load(path)
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), volume)
    np.testing.assert_array_equal(loaded.affine, affine)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_failed_metrics_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = atomic_write_json({"auroc": 0.9}, tmp_path / "metrics.json")

    def disk_full(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(WriteError, match=r"metrics.json: No space left on device; the previous metrics.json is intact"):
        atomic_write_json({"auroc": 0.5}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"auroc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary file left behind"


def test_a_checkpoint_with_non_finite_weights_is_refused_in_one_line(tmp_path):
    from pipeline.errors import InputError
    from pipeline.weights import load_trained

    net = torch.nn.Linear(2, 2)
    good = save_checkpoint({"model": net}, tmp_path / "good.pt")
    load_trained(good, torch.nn.Linear(2, 2))  # negative control: finite weights load
    with torch.no_grad():
        net.bias[1] = float("nan")
    bad = save_checkpoint({"model": net}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"bad.pt holds non-finite weights \(bias\): .*diverged") as refused:
        load_trained(bad, torch.nn.Linear(2, 2))
    assert "\n" not in str(refused.value)


def test_truncated_garbage_and_foreign_checkpoints_are_refused_in_one_line(tmp_path):
    """Inference and export read checkpoints through one function: a truncated file, random bytes and weights of
    another architecture each get one line naming the file; negative control: the intact file loads."""
    from pipeline.errors import InputError
    from pipeline.weights import load_trained, split_trained

    good = save_checkpoint({"model": torch.nn.Linear(4, 3)}, tmp_path / "good.pt")
    load_trained(good, torch.nn.Linear(4, 3))
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    for name in ("truncated.pt", "garbage.pt"):
        for read in (lambda p: load_trained(p, torch.nn.Linear(4, 3)), split_trained):
            with pytest.raises(InputError, match=rf"{name} is not a readable PyTorch file") as refused:
                read(tmp_path / name)
            assert "\n" not in str(refused.value)
    with pytest.raises(InputError, match=r"good.pt does not fit this network .*config.json") as refused:
        load_trained(good, torch.nn.Linear(5, 3))
    assert "\n" not in str(refused.value)


def test_a_folder_lock_serialises_and_leaves_no_file(tmp_path):
    """``file_lock`` on a folder: a second holder waits until the first releases (forced: the first holds it while
    the second tries), nothing is written into the folder; negative control: another folder does not wait."""
    from pipeline.io import file_lock

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    entered = {}

    def second(folder):
        with file_lock(folder):
            entered[folder.name] = time.monotonic()

    with file_lock(tmp_path / "a"):
        held = time.monotonic()
        waiting = threading.Thread(target=second, args=(tmp_path / "a",))
        other = threading.Thread(target=second, args=(tmp_path / "b",))
        waiting.start()
        other.start()
        other.join(5)
        time.sleep(0.5)
        assert "b" in entered and "a" not in entered, "the held folder blocks, another does not"
        released = time.monotonic()
    waiting.join(5)
    assert entered["a"] >= released > held
    assert not any((tmp_path / "a").iterdir()) and not any((tmp_path / "b").iterdir()), "no lock file left"
