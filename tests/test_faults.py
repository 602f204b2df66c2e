"""Faults lose nothing: kill -9 at any moment of training or prepcache, then resume or
run again, and every checkpoint and cache entry is whole, consistent and what an
uninterrupted run makes; no temporary file stays. Unwritable directories, diverged
weights and a broken scan read by a DataLoader worker are one clear line.

Kills are real: a forked child process (see `processes`) receives SIGKILL either at
a chosen file write (deterministic: every checkpoint write, before and after its
rename) or at a random moment of a run.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from processes import SKIP_STATUS, kill_at_replace, kill_group, leftovers, run_forked, without_root_file_access

from luna.annotations import load_candidate_infos
from luna.cache import ArrayCache
from luna.chunks import ChunkSource
from luna.cli import run_cli
from luna.datadir import DataDir
from luna.devices import Devices
from luna.errors import LunaError
from luna.io import load_ct
from luna.models import NoduleClassifier, load_checkpoint
from luna.prepcache import main as prepcache_main
from luna.training.app import main as training_main
from luna.training.config import LoopConfig
from luna.training.stage import EpochResult, Stage

# ----------------------------------------------------------------- the epoch loop


class ScriptedStage(Stage):
    """`Stage.run` as training runs it, with a tiny real model and real optimizer steps,
    but validation scores given in advance, so which epoch is best is known."""

    name = "scripted"
    score_name = "auc"

    def __init__(self, directory: Path, scores, *, epochs: int, resume: bool = False, diverge_at: int | None = None):
        loop = LoopConfig(epochs=epochs, num_workers=0, resume=resume, progress=False)
        super().__init__(loop, Devices(torch.device("cpu")), directory, record={"scores": list(scores)})
        torch.manual_seed(0)
        self.model = NoduleClassifier(width=1, depth=1, chunk_shape=(4, 4, 4))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.scores = list(scores)
        self.diverge_at = diverge_at

    def train_epoch(self, epoch: int) -> EpochResult:
        if epoch == self.diverge_at:  # a learning rate no network survives
            self.optimizer.param_groups[0]["lr"] = float("inf")
        chunks = 100 * torch.randn(4, 1, 4, 4, 4, generator=torch.Generator().manual_seed(epoch))
        loss = F.cross_entropy(self.model(chunks), torch.tensor([0, 1, 0, 1]))
        self.optimizer_step(loss)
        self.samples_seen += 4
        return EpochResult(loss.item(), {}, 4, 0.01)

    def validate(self, epoch: int) -> EpochResult:
        score = self.scores[epoch - 1]  # a score, or (score, validation loss)
        score, loss = score if isinstance(score, tuple) else (score, 0.0)
        return EpochResult(loss, {"auc": score}, 4, 0.01)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model_state"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def assert_consistent(stage_dir: Path) -> tuple[dict, dict]:
    """last.pt and best.pt load, best.pt is the epoch last.pt names as best, no temporary file."""
    last = load_checkpoint(stage_dir / "last.pt")
    best = load_checkpoint(stage_dir / "best.pt")
    assert best["epoch"] == last["metrics"]["best_epoch"]
    assert best["metrics"]["score"] == last["metrics"]["best_score"]
    assert leftovers(stage_dir) == []
    return last, best


def test_a_resumed_run_keeps_its_best_score(tmp_path):
    scores = [0.9, 0.5, 0.6]  # epoch 1 is the best; 2 and 3 are worse
    first = ScriptedStage(tmp_path, scores, epochs=1).run()
    assert (first.best_epoch, first.best_score) == (1, 0.9)
    best_after_one = weights(tmp_path / "best.pt")

    result = ScriptedStage(tmp_path, scores, epochs=3, resume=True).run()
    assert (result.best_epoch, result.best_score) == (1, 0.9)
    last, best = assert_consistent(tmp_path)
    assert last["epoch"] == 3 and best["epoch"] == 1
    assert_same_weights(weights(tmp_path / "best.pt"), best_after_one)  # never overwritten by a worse epoch


def test_an_equal_score_at_a_lower_validation_loss_is_the_better_epoch_also_after_resume(tmp_path):
    # the segmentation's case: nodule recall 0.857 at epochs 1 and 2, epoch 2 with the lower loss
    scores = [(0.857, 1.82), (0.857, 1.76), (0.857, 1.90), (0.5, 0.1)]
    assert ScriptedStage(tmp_path / "a", scores, epochs=4).run().best_epoch == 2
    ScriptedStage(tmp_path / "b", scores, epochs=2).run()
    resumed = ScriptedStage(tmp_path / "b", scores, epochs=4, resume=True).run()
    assert resumed.best_epoch == 2  # epoch 3 ties at a higher loss: the resumed run knows epoch 2's loss
    last, best = assert_consistent(tmp_path / "b")
    assert last["metrics"]["best_loss"] == pytest.approx(1.76)


SCORES = [0.5, 0.7, 0.6, 0.8]  # best.pt is written after epochs 1, 2 and 4
KILL_POINTS = [("last.pt", k, when) for k in range(1, 5) for when in ("before", "after")] + [
    ("best.pt", k, when) for k in range(1, 4) for when in ("before", "after")]


def run_scripted(stage_dir: Path) -> int:
    ScriptedStage(stage_dir, SCORES, epochs=4).run()
    return 0


@pytest.fixture(scope="module")
def scripted_reference(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("uninterrupted")
    ScriptedStage(directory, SCORES, epochs=4).run()
    return directory


@pytest.mark.parametrize("name, occurrence, when", KILL_POINTS)
def test_kill_at_any_checkpoint_write_then_resume_loses_nothing(tmp_path, scripted_reference, name, occurrence, when):
    stage_dir = tmp_path / "stage"
    status = run_forked(run_scripted, stage_dir, log=tmp_path / "log", prepare=kill_at_replace(name, occurrence, when))
    assert status == -9, (tmp_path / "log").read_text()
    for path in (stage_dir / "last.pt", stage_dir / "best.pt"):  # whatever is there is whole
        if path.exists():
            load_checkpoint(path)

    result = ScriptedStage(stage_dir, SCORES, epochs=4, resume=True).run()
    last, best = assert_consistent(stage_dir)
    reference = load_checkpoint(scripted_reference / "last.pt")
    assert last["epoch"] == 4 and last["samples_seen"] == reference["samples_seen"] == 16
    assert (result.best_epoch, result.best_score) == (best["epoch"], best["metrics"]["score"]) == (4, 0.8)
    assert_same_weights(last["model_state"], reference["model_state"])
    assert_same_weights(best["model_state"], weights(scripted_reference / "best.pt"))


def test_a_best_checkpoint_that_cannot_be_rebuilt_is_an_error(tmp_path):
    ScriptedStage(tmp_path, [0.9, 0.5], epochs=2).run()
    (tmp_path / "best.pt").unlink()  # lost by hand: last.pt (epoch 2) does not hold epoch 1
    with pytest.raises(LunaError, match=r"best\.pt is missing.*epoch 1 as the best.*restore"):
        ScriptedStage(tmp_path, [0.9, 0.5, 0.7], epochs=3, resume=True).run()


def test_diverged_weights_stop_the_stage_before_they_are_saved(tmp_path):
    with pytest.raises(LunaError, match=r"diverged in epoch 2: NaN or infinite.*last\.pt still holds epoch 1.*--lr"):
        ScriptedStage(tmp_path, [0.5, 0.6, 0.7], epochs=3, diverge_at=2).run()
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model_state"].values() if v.is_floating_point())


# ----------------------------------------------------------------- python -m luna.training


@pytest.fixture(scope="module")
def small_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny phantoms with every positive candidate and 4 negatives per scan: fast epochs."""
    root = tmp_path_factory.mktemp("small") / "data"
    shutil.copytree(tiny_dataset, root)
    with open(tiny_dataset / "candidates.csv", newline="") as f:
        rows = list(csv.reader(f))
    negatives: dict[str, int] = {}
    kept = [rows[0]]
    for row in rows[1:]:
        if row[4] == "0":
            negatives[row[0]] = negatives.get(row[0], 0) + 1
            if negatives[row[0]] > 4:
                continue
        kept.append(row)
    with open(root / "candidates.csv", "w", newline="") as f:
        csv.writer(f).writerows(kept)
    return root


def training_argv(data: Path, cache: Path, run: Path, *, resume: bool = False) -> list[str]:
    where = ["--resume", str(run)] if resume else ["--run-dir", str(run)]
    return ["--stage", "nodule", "--data-dir", str(data), "--cache-dir", str(cache), "--epochs", "2",
            "--batch-size", "8", "--epoch-size", "16", "--num-workers", "0", "--val-stride", "2", "--width", "2",
            "--no-progress", *where]


def test_training_killed_at_random_moments_resumes_to_the_same_checkpoints(small_dataset, tmp_path):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    started = time.monotonic()
    assert run_forked(run_cli, training_main, training_argv(small_dataset, cache, reference), log=tmp_path / "log") == 0
    duration = time.monotonic() - started
    ref_last = load_checkpoint(reference / "nodule" / "last.pt")

    rng = np.random.default_rng(15)
    kills = [("the last.pt write of epoch 1, before best.pt", kill_at_replace("last.pt", 1, "after"), None)]
    kills += [(f"{delay:.1f} s", None, delay) for delay in sorted(rng.uniform(0.15, 0.9, size=2) * duration)]
    for k, (moment, prepare, delay) in enumerate(kills):
        run = tmp_path / f"killed{k}"
        status = run_forked(run_cli, training_main, training_argv(small_dataset, cache, run), log=tmp_path / "log",
                            prepare=prepare, kill_after=delay)
        # a random moment may fall after the end on a busy machine: then it finished
        assert status == -9 or (status == 0 and delay is not None), f"status {status} at {moment}"
        again = training_argv(small_dataset, cache, run, resume=run.is_dir())
        assert run_forked(run_cli, training_main, again, log=tmp_path / "log") == 0, (tmp_path / "log").read_text()
        last, best = assert_consistent(run / "nodule")
        assert leftovers(run) == [], moment
        assert last["epoch"] == 2 and last["samples_seen"] == ref_last["samples_seen"], moment
        assert last["metrics"]["best_epoch"] == ref_last["metrics"]["best_epoch"], moment
        assert_same_weights(last["model_state"], ref_last["model_state"])
        assert_same_weights(best["model_state"], weights(reference / "nodule" / "best.pt"))
    assert ArrayCache(cache).remove_orphans() == 0


def test_a_training_option_error_leaves_no_run_directory(tiny_dataset, isolated_working_directory, capsys):
    for bad in (["--batch-size", "0"], ["--lr", "nan"], ["--lr", "-0.01"], ["--num-workers", "-1"],
                ["--epoch-size", "-5"], ["--balanced", "-1"], ["--tubes", "1.5"]):
        assert run_cli(training_main, ["--data-dir", str(tiny_dataset), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and bad[0] in err, err
    assert list(isolated_working_directory.iterdir()) == []  # no data-unversioned/runs/...


def test_a_bad_finetune_checkpoint_is_one_line_and_leaves_no_run_directory(tiny_dataset, isolated_working_directory,
                                                                            tmp_path, capsys):
    """The checkpoint is read when its stage is built, after run.json: the run it began goes again."""
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04" + bytes(100))
    assert run_cli(training_main, ["--stage", "malignancy", "--data-dir", str(tiny_dataset), "--cache-dir",
                                   str(tmp_path / "cache"), "--finetune", str(truncated), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(truncated) in last, last
    assert not any(isolated_working_directory.rglob("run.json"))
    given = tmp_path / "given"  # a --run-dir that existed before is the user's: left as it was
    given.mkdir()
    assert run_cli(training_main, ["--stage", "malignancy", "--data-dir", str(tiny_dataset), "--cache-dir",
                                   str(tmp_path / "cache"), "--finetune", str(truncated), "--no-progress",
                                   "--run-dir", str(given)]) == 2
    assert given.is_dir()


def test_a_broken_scan_read_by_a_dataloader_worker_is_one_line(small_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    for raw in data.rglob("*.raw"):
        raw.write_bytes(raw.read_bytes()[:1000])  # every scan truncated: the first sample read fails
    argv = [*training_argv(data, tmp_path / "cache", tmp_path / "run"), "-q"]  # -q: no progress lines
    argv[argv.index("--num-workers") + 1] = "2"
    assert run_cli(training_main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "DataLoader worker" in err
    assert any(p.name in err for p in data.rglob("*.mhd")), err


def test_unwritable_run_and_cache_directories_are_one_line(small_dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    existing = locked / "existing-cache"  # a cache made earlier, now read-only
    ArrayCache(existing).set("entry", np.arange(3))
    for path in [locked, *locked.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    cases = [
        (training_main, training_argv(small_dataset, tmp_path / "cache", locked / "run"), "run directory"),
        (training_main, training_argv(small_dataset, locked / "cache", tmp_path / "run"), "cache directory"),
        (prepcache_main, ["--data-dir", str(small_dataset), "--cache-dir", str(locked / "cache"), "--no-progress"],
         "cache directory"),
        (prepcache_main, ["--data-dir", str(small_dataset), "--cache-dir", str(existing), "--no-progress"],
         "cache directory"),
    ]
    try:
        for k, (command, argv, what) in enumerate(cases):
            log = tmp_path / f"log{k}"
            status = run_forked(run_cli, command, argv, log=log, prepare=without_root_file_access(locked))
            if status == SKIP_STATUS:
                pytest.skip("permission bits cannot be made to apply here")
            text = log.read_text()
            errors = [line for line in text.splitlines() if line.startswith("error:")]
            assert status == 2 and "Traceback" not in text, text
            assert len(errors) == 1 and what in errors[0] and str(locked) in errors[0], text
        assert sorted(p.name for p in locked.iterdir()) == ["existing-cache"]
    finally:
        for path in [locked, *locked.rglob("*")]:
            path.chmod(0o755)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                     sqlite3.OperationalError("database or disk is full")])
def test_a_full_cache_disk_is_one_line(tmp_path, monkeypatch, failure):
    import diskcache.core

    cache = ArrayCache(tmp_path / "cache")
    cache.set("kept", np.arange(4))

    def full(*args, **kwargs):  # what the file write or the SQLite commit raises on a full disk
        raise failure

    monkeypatch.setattr(diskcache.core.Disk, "store", full)
    with pytest.raises(LunaError, match=rf"cache directory {tmp_path / 'cache'}: cannot write to it \(.*(space|full)"):
        cache.set("new", np.zeros(100_000))
    monkeypatch.undo()
    np.testing.assert_array_equal(cache.get("kept"), np.arange(4))  # what was there is intact
    assert cache.get("new") is None


def test_every_test_runs_in_an_empty_directory_of_its_own(isolated_working_directory):
    assert Path.cwd() == isolated_working_directory and list(Path.cwd().iterdir()) == []
    assert "LUNA_DATA_DIR" not in os.environ and "LUNA_CACHE_DIR" not in os.environ


# ----------------------------------------------------------------- python -m luna.prepcache


def cache_files(cache_dir: Path) -> tuple[set[str], set[str]]:
    """(value files on disk, value files the entries refer to), read with sqlite3 directly."""
    on_disk, referenced = set(), set()
    for db in cache_dir.glob("*/cache.db"):
        shard = db.parent
        on_disk |= {str(p.relative_to(cache_dir)) for p in shard.rglob("*.val")}
        with sqlite3.connect(db) as connection:
            try:
                rows = connection.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()
            except sqlite3.OperationalError:  # killed before diskcache made its table
                rows = []
        referenced |= {str(Path(shard.name) / name) for (name,) in rows}
    return on_disk, referenced


def assert_cache_complete_and_valid(data_root: Path, cache_dir: Path) -> None:
    """Every candidate's entry is there and equals its chunk cut afresh from the scan."""
    data = DataDir.open(data_root)
    source = ChunkSource(data, ArrayCache(cache_dir))
    infos = load_candidate_infos(data.root, data.series_uids)
    assert len(source.cache) == len({source.key(i.series_uid, i.center_xyz) for i in infos})
    for uid in data.series_uids:
        ct = load_ct(data.scan_path(uid))
        for info in (i for i in infos if i.series_uid == uid):
            cached = source.cache.get(source.key(uid, info.center_xyz))
            assert cached is not None, info
            np.testing.assert_array_equal(cached, ct.crop(info.center_xyz, source.shape_irc))
    on_disk, referenced = cache_files(cache_dir)
    assert on_disk == referenced  # no orphan value file, no entry without its file
    assert leftovers(cache_dir) == []


def prepcache_argv(data: Path, cache: Path, workers: int = 2) -> list[str]:
    return ["--data-dir", str(data), "--cache-dir", str(cache), "--num-workers", str(workers), "--no-progress"]


def test_prepcache_killed_at_random_moments_completes_on_the_next_run(tiny_dataset, tmp_path, capsys):
    started = time.monotonic()
    log = tmp_path / "log"
    assert run_forked(run_cli, prepcache_main, prepcache_argv(tiny_dataset, tmp_path / "reference"), log=log) == 0
    duration = time.monotonic() - started
    total = len(load_candidate_infos(tiny_dataset, DataDir.open(tiny_dataset).series_uids))

    # kill points: right after a value file is written and before its entry is
    # committed (what leaves an orphan file), and two random moments
    def orphan_kill() -> None:
        import diskcache.core

        real = diskcache.core.Disk.store

        def store(self, value, read, key=diskcache.core.UNKNOWN):
            result = real(self, value, read, key=key)
            if result[2] is not None:  # a value file was written
                kill_group()
            return result

        diskcache.core.Disk.store = store

    rng = np.random.default_rng(16)
    kills = [(orphan_kill, None, 0)] + [(None, delay, 2) for delay in rng.uniform(0.2, 0.9, size=2) * duration]
    for k, (prepare, delay, workers) in enumerate(kills):
        cache = tmp_path / f"killed{k}"
        status = run_forked(run_cli, prepcache_main, prepcache_argv(tiny_dataset, cache, workers), log=log,
                            prepare=prepare, kill_after=delay)
        assert status == -9 or (status == 0 and delay is not None), status
        if k == 0:
            on_disk, referenced = cache_files(cache)
            assert on_disk - referenced  # the kill left an orphan value file behind
        assert prepcache_main(prepcache_argv(tiny_dataset, cache)) == 0
        summary = capsys.readouterr().out
        cut = int(summary.split(" chunks cut")[0].rsplit(" ", 1)[1])
        assert f"{total} candidates" in summary and f"{cut} chunks cut, {total - cut} already cached" in summary
        assert_cache_complete_and_valid(tiny_dataset, cache)


def test_prepcache_counts_failed_candidates_apart(small_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    broken = sorted(data.rglob("*.raw"))[0]
    broken.write_bytes(broken.read_bytes()[:1000])
    uid = broken.stem
    infos = load_candidate_infos(data, DataDir.open(data).series_uids)
    failed = sum(1 for i in infos if i.series_uid == uid)
    assert run_cli(prepcache_main, prepcache_argv(data, tmp_path / "cache", workers=0)) == 2
    out = capsys.readouterr().out
    total = len(infos)
    assert f"{total - failed} chunks cut, 0 already cached, {failed} not cut (scan failed)" in out
    assert f"failed: {uid}" in out
