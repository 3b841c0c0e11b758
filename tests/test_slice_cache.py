"""The on-disk slice cache: same slices as in memory, reuse, invalidation, damaged entries, concurrent writers."""

from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.slice_cache import SliceCache
from pipeline.data.slices import BrainSliceDataset, SliceSelection, VolumeSlices
from pipeline.io import WriteError


@pytest.fixture
def entries(tiny_demo, tmp_path):
    """The tiny demo's test entries (image, brain mask, label), copied so that a test may change a file."""
    datalist = json.loads(tiny_demo.read_text())
    out = []
    for i, entry in enumerate(datalist["test"][:3]):
        copied = {}
        for key in ("image", "brainmask", "label"):
            target = tmp_path / "data" / f"s{i}_{key}.nii.gz"
            target.parent.mkdir(exist_ok=True)
            target.write_bytes((tiny_demo.parent / entry[key]).read_bytes())
            copied[key] = str(target)
        out.append(copied)
    return out


@pytest.fixture
def builds(monkeypatch):
    """Counts the volumes preprocessed in this process."""
    calls = []
    original = VolumeSlices.preprocess

    def counted(self, entry, keys):
        calls.append(entry["image"])
        return original(self, entry, keys)

    monkeypatch.setattr(VolumeSlices, "preprocess", counted)
    return calls


def dataset(entries, cache_dir, image_size=32, **kwargs):
    return BrainSliceDataset(
        entries,
        brain_volume_transform(image_size=image_size),
        SliceSelection(min_brain_fraction=0.1),
        progress=False,
        cache_dir=cache_dir,
        **kwargs,
    )


def assert_same_slices(a, b):
    assert len(a) == len(b) and a.keys == b.keys
    for key in a.keys:
        torch.testing.assert_close(a.stacked(key), b.stacked(key), rtol=0, atol=0)
    for i in (0, len(a) // 2, len(a) - 1):
        for key in a.keys:
            torch.testing.assert_close(a[i][key], b[i][key], rtol=0, atol=0)
    assert torch.equal(a.position, b.position) and torch.equal(a.slice, b.slice)


def entry_folders(cache_dir):
    return sorted(p for p in cache_dir.glob("*/*") if p.is_dir() and not p.name.startswith("."))


def test_cached_slices_equal_the_in_memory_ones_and_are_reused(entries, tmp_path, builds):
    memory = dataset(entries, None)
    assert len(builds) == 3
    cached = dataset(entries, tmp_path / "cache")
    assert len(builds) == 6 and len(entry_folders(tmp_path / "cache")) == 3
    assert_same_slices(cached, memory)
    again = dataset(entries, tmp_path / "cache", keys=("image",))
    assert len(builds) == 6, "the second run preprocesses nothing"
    assert again.keys == ("image",) and torch.equal(again.stacked("image"), memory.stacked("image"))
    parallel = dataset(entries, tmp_path / "cache2", num_workers=2)
    assert_same_slices(parallel, memory)
    assert len(entry_folders(tmp_path / "cache2")) == 3


def test_a_batch_read_gives_each_indexed_slice_in_order(entries, tmp_path):
    """``__getitems__`` (a DataLoader's batch) reads each volume's slices together; every item is the slice that
    ``np.load`` of the whole arrays gives at that index, masks as 0/1 floats, in the order asked, repeats kept."""
    for cached in (dataset(entries, tmp_path / "cache"), dataset(entries, None)):
        reference = {key: cached.stacked(key) for key in cached.keys}
        order = torch.randperm(len(cached), generator=torch.Generator().manual_seed(0)).tolist()[:40] + [3, 3]
        items = cached.__getitems__(order)
        assert len({int(item["subject"]) for item in items}) == 3, "the batch spans every volume"
        for i, item in zip(order, items):
            for key in cached.keys:
                assert item[key].dtype == torch.float32 and torch.equal(item[key], reference[key][i])
            assert int(item["subject"]) == int(cached.subject[i]) and int(item["slice"]) == int(cached.slice[i])
        batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=len(order), sampler=order)))
        assert torch.equal(batch["image"], reference["image"][order])


def test_a_changed_file_or_setting_rebuilds_only_its_entries(entries, tmp_path, builds):
    cache = tmp_path / "cache"
    dataset(entries, cache)
    before = {p.name: p.stat().st_mtime_ns for p in entry_folders(cache)}
    image = nib.load(entries[1]["image"])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 1.5 + 1, image.affine), entries[1]["image"])
    builds.clear()
    changed = dataset(entries, cache)
    assert builds == [entries[1]["image"]], "only the changed volume is preprocessed again"
    after = {p.name: p.stat().st_mtime_ns for p in entry_folders(cache)}
    assert len(set(after) - set(before)) == 1 and all(after[k] == before[k] for k in before)
    assert_same_slices(changed, dataset(entries, None))
    builds.clear()
    dataset(entries, cache, image_size=48)
    assert len(builds) == 3, "another image_size is another preprocessing: every entry is new"


def test_damaged_entries_are_detected_and_rebuilt(entries, tmp_path, builds):
    cache = tmp_path / "cache"
    reference = dataset(entries, cache)
    first, second, third = entry_folders(cache)
    with open(first / "image.npy", "r+b") as handle:  # truncated
        handle.truncate(first.joinpath("image.npy").stat().st_size - 100)
    (second / "meta.json").unlink()  # half-deleted
    (third / "brainmask.npy").write_bytes(b"not an array")  # overwritten
    builds.clear()
    rebuilt = dataset(entries, cache)
    assert len(builds) == 3
    assert_same_slices(rebuilt, reference)
    assert not [p for p in cache.glob("*/.*") if p.is_dir()], "no temporary or stale folders left"


def test_entries_whose_values_changed_at_the_same_size_are_rebuilt(entries, tmp_path, builds):
    """Not caught by sizes and headers: plausible values written over an entry's data, and a valid ``.npy`` of other
    values of the same shape put in its place. Both are rebuilt; the slices read are the true ones."""
    cache = tmp_path / "cache"
    reference = dataset(entries, cache)
    first, second, _ = entry_folders(cache)
    image = np.load(first / "image.npy")
    offset = first.joinpath("image.npy").stat().st_size - image.nbytes
    with open(first / "image.npy", "r+b") as handle:  # same size, same header, plausible floats
        handle.seek(offset)
        handle.write(np.ascontiguousarray(image[::-1]).tobytes())
    np.save(second / "image.npy", np.load(second / "image.npy") * 0.5)  # a valid array of other values
    builds.clear()
    rebuilt = dataset(entries, cache)
    assert len(builds) == 2, "the two changed entries, not the intact one"
    assert_same_slices(rebuilt, reference)


class Builders:
    """Slice-cache builders in threads of this process, and the locks they wait for. ``fcntl.flock`` locks belong to
    an open file description, so a builder thread that opens ``<key>.lock`` itself contends with the test's own open
    handle exactly as another process (a DDP rank, a comparison child) does. :meth:`wait_blocked` returns once ``n``
    builders have asked for an exclusive lock on ``lock``: the race is forced, not slept for."""

    def __init__(self, monkeypatch) -> None:
        self.asked: list[str] = []
        self._changed = threading.Condition()
        flock = fcntl.flock

        def recorded(handle, operation):
            if operation == fcntl.LOCK_EX and threading.current_thread() is not threading.main_thread():
                with self._changed:
                    self.asked.append(handle.name)
                    self._changed.notify_all()
            return flock(handle, operation)

        monkeypatch.setattr(fcntl, "flock", recorded)

    def start(self, entries, cache) -> tuple[threading.Thread, list]:
        """A thread that builds ``entries``' slices in ``cache``; its list gets the data set's length or the error."""
        result: list = []

        def build():
            try:
                result.append(len(dataset(entries, cache)))
            except Exception as err:  # reported by the test, not lost in the thread
                result.append(err)

        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        return thread, result

    def wait_blocked(self, lock: Path, n: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.asked.count(str(lock)) >= n, timeout=120), self.asked


def finished(*started) -> list:
    for thread, _ in started:
        thread.join(120)
    assert not any(thread.is_alive() for thread, _ in started), "a builder is still waiting"
    return [result[0] for _, result in started]


def test_concurrent_writers_build_each_entry_once(entries, tmp_path, builds, monkeypatch):
    builders = Builders(monkeypatch)
    cache, shared = tmp_path / "cache", tmp_path / "shared"
    # forced race: another writer holds an entry's lock; the builder waits for it instead of writing beside it
    store = SliceCache(
        cache,
        {
            "transform": brain_volume_transform(image_size=32).cache_settings,
            "min_brain_fraction": 0.1,
            "border_slices": 0,
            "mask_key": "brainmask",
        },
    )
    key = store.key(entries[0])
    lock_path = cache / key[:2] / f"{key}.lock"
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = builders.start(entries[:1], cache)
        builders.wait_blocked(lock_path, 1)
        assert waiting[0].is_alive() and store.get(key) is None, "the builder waits for the lock holder"
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert finished(waiting)[0] > 0 and store.get(key) is not None
    # two builders of the same three volumes at once: both succeed, each volume is preprocessed once
    builds.clear()
    counted = finished(builders.start(entries, shared), builders.start(entries, shared))
    assert counted[0] == counted[1] > 0, counted
    assert sorted(builds) == sorted(e["image"] for e in entries)
    assert len(entry_folders(shared)) == 3
    assert not [p for p in shared.glob("*/.*") if p.is_dir()]
    # forced race on a damaged entry: both builders find it damaged and wait for its lock; the first to get it
    # replaces the entry, the second then finds the new one (the volume is preprocessed once, both read true slices)
    damaged = store.key(entries[0])
    folder = next(f for f in entry_folders(shared) if f.name == damaged)
    with open(folder / "image.npy", "r+b") as handle:
        handle.truncate(folder.joinpath("image.npy").stat().st_size - 100)
    builds.clear()
    lock_path = folder.parent / f"{damaged}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builders.asked.clear()
        racers = builders.start(entries, shared), builders.start(entries, shared)
        builders.wait_blocked(lock_path, 2)
        assert all(thread.is_alive() for thread, _ in racers), "both wait for the damaged entry's lock"
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert finished(*racers) == counted
    assert builds == [entries[0]["image"]], "replaced once, by one of them"
    assert len(entry_folders(shared)) == 3
    assert not [p for p in shared.glob("*/.*") if p.is_dir()], "the damaged copy is not left behind"


def test_a_transform_without_cache_settings_is_refused_with_a_cache(entries, tmp_path):
    with pytest.raises(ValueError, match="cache_settings"):
        BrainSliceDataset(entries, lambda item: item, progress=False, cache_dir=tmp_path)


def test_an_unwritable_cache_stops_in_one_line_naming_it(entries, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WriteError) as info:
        dataset(entries, blocker / "cache")
    message = str(info.value)
    assert "\n" not in message and str(blocker / "cache") in message and "--cache_dir" in message


@pytest.mark.parametrize("workers", [0, 2])
def test_preparing_the_slices_leaves_the_random_stream_of_training_alone(entries, tmp_path, workers):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dataset(entries, tmp_path / "cache", num_workers=workers)
    assert torch.equal(torch.rand(3), expected), "same seed, same training, however the slices were prepared"
