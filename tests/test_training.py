"""python -m luna.training: one epoch writes checkpoints and events, resume is exact,
the classifier can overfit, DistributedDataParallel on CPU (gloo) writes from rank 0 only,
CPU training keeps the memory it frees."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from luna.cli import run_cli
from luna.devices import is_glibc
from luna.evaluate.segmentation import OPERATING_THRESHOLDS
from luna.inference.pipeline import SEARCH_BUDGET
from luna.models import build_model_from_checkpoint, load_checkpoint
from luna.training.app import main

FAST = ["--batch-size", "8", "--epoch-size", "16", "--num-workers", "0", "--val-stride", "2", "--no-progress"]


def _args(tiny_dataset, tmp_path, *extra):
    return ["--stage", "nodule", "--data-dir", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"), *FAST, *extra]


def _events(directory):
    return sorted(p.name for p in directory.glob("events.out.tfevents.*"))


def test_one_epoch_writes_checkpoints_and_tensorboard(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(tiny_dataset, tmp_path, "--epochs", "1", "--run-dir", str(run), "--augment",
                      "--lr", "5e-4")) == 0
    out = capsys.readouterr().out
    assert "[nodule] epoch 1/1 train" in out and "[nodule] epoch 1/1 val" in out
    assert "Training done" in out and "python -m luna.diagnose" in out
    stage = run / "nodule"
    assert (stage / "last.pt").exists() and (stage / "best.pt").exists()
    assert len(_events(stage / "train")) == 1 and len(_events(stage / "val")) == 1
    assert (run / "run.json").exists()
    checkpoint = load_checkpoint(stage / "best.pt")
    assert checkpoint["stage"] == "nodule" and checkpoint["epoch"] == 1
    # --lr, when given, replaces the stage's own rate
    assert checkpoint["optimizer_state"]["param_groups"][0]["initial_lr"] == 5e-4
    assert checkpoint["samples_seen"] == 16
    assert 0.0 <= checkpoint["metrics"]["val"]["auc"] <= 1.0
    model = build_model_from_checkpoint(checkpoint).eval()
    assert model(torch.zeros(2, 1, 32, 48, 48)).shape == (2, 2)


def test_amp_on_cpu_trains_in_bfloat16(tiny_dataset, tmp_path, capsys):
    from luna.devices import Devices

    assert Devices.setup("cpu", amp=True).amp_dtype == torch.bfloat16
    assert main(_args(tiny_dataset, tmp_path, "--epochs", "1", "--run-dir", str(tmp_path / "r"), "--amp")) == 0
    checkpoint = load_checkpoint(tmp_path / "r" / "nodule" / "last.pt")
    assert checkpoint["search_budget"] == 0  # no segmentation model, no proposals: no faint blobs to propose
    # weights stay float32 under autocast
    weights = [v for v in checkpoint["model_state"].values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 for v in weights)


_FAULT_PROBE = """
import resource, sys, torch
from luna.devices import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
layer = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU())
x = torch.randn(24, 1, 32, 48, 48)  # activations of 56 MiB, as the classifier's first layers at batch 24
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    layer(x).sum().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()  # the first step's memory comes from the kernel either way
print(kept, sum(faults() for _ in range(4)))
"""


def _fault_probe(mode: str, **env) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", _FAULT_PROBE, mode], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, check=True)
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not is_glibc(), reason="glibc only")
def test_cpu_training_keeps_freed_memory_instead_of_faulting_it_in_again():
    # Each step of a 3D layer at batch 24 frees and allocates tensors over glibc's mmap
    # threshold; kept, they no longer come back from the kernel page by page.
    kept, kept_faults = _fault_probe("keep")
    default, default_faults = _fault_probe("default")
    assert (kept, default) == ("True", "False")
    assert kept_faults < default_faults / 3  # measured: 69,000 against 498,000 (4 KiB pages)
    # a user's own glibc setting stands
    assert _fault_probe("keep", MALLOC_MMAP_MAX_="65536")[0] == "False"


def test_tensorboard_events_hold_the_curves(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    main(_args(tiny_dataset, tmp_path, "--epochs", "2", "--run-dir", str(run)))
    val = EventAccumulator(str(run / "nodule" / "val"), size_guidance={"images": 0}).Reload()
    tags = val.Tags()
    for tag in ["loss", "accuracy/pos", "accuracy/neg", "precision", "recall", "f1", "auc"]:
        assert tag in tags["scalars"], tag
        steps = [e.step for e in val.Scalars(tag)]
        assert steps == [16, 32]  # x-axis: training samples seen
    assert "probability/pos" in tags["histograms"] and "probability/neg" in tags["histograms"]
    assert "roc" in tags["images"]
    assert any("pr" in t for t in tags["tensors"])


def test_resume_continues_exactly(tiny_dataset, tmp_path, monkeypatch):
    from luna.training.classification import NoduleStage

    straight, split = tmp_path / "straight", tmp_path / "split"
    main(_args(tiny_dataset, tmp_path, "--epochs", "2", "--run-dir", str(straight), "--augment"))
    # the same run, stopped during its second epoch
    original = NoduleStage.train_epoch

    def crash_in_epoch_two(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(NoduleStage, "train_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        main(_args(tiny_dataset, tmp_path, "--epochs", "2", "--run-dir", str(split), "--augment"))
    monkeypatch.setattr(NoduleStage, "train_epoch", original)
    after_one = load_checkpoint(split / "nodule" / "last.pt")
    main(_args(tiny_dataset, tmp_path, "--epochs", "2", "--resume", str(split), "--augment"))
    a = load_checkpoint(straight / "nodule" / "last.pt")
    b = load_checkpoint(split / "nodule" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["samples_seen"] == b["samples_seen"] == 32
    for key, value in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for (ka, sa), (kb, sb) in zip(a["optimizer_state"]["state"].items(), b["optimizer_state"]["state"].items()):
        for name in sa:
            torch.testing.assert_close(sb[name], sa[name], rtol=1e-5, atol=1e-6)
    assert a["scheduler_state"]["last_epoch"] == b["scheduler_state"]["last_epoch"] == 2
    assert after_one["epoch"] == 1


def test_classifier_overfits_a_tiny_set(tiny_dataset):
    from luna.annotations import load_candidate_infos
    from luna.chunks import ChunkSource
    from luna.data import ChunkDataset
    from luna.datadir import DataDir
    from luna.models import NoduleClassifier

    torch.manual_seed(0)
    data = DataDir.open(tiny_dataset)
    infos = load_candidate_infos(data.root, data.series_uids)
    positives = [i for i in infos if i.is_nodule][:4]
    negatives = [i for i in infos if not i.is_nodule][:4]
    dataset = ChunkDataset(positives + negatives, ChunkSource(data, None))
    chunks = torch.stack([dataset[i].chunk for i in range(len(dataset))])
    labels = torch.as_tensor(dataset.labels)
    model = NoduleClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(chunks), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    accuracy = (model(chunks).argmax(1) == labels).float().mean().item()
    assert losses[-1] < 0.2 * losses[0]
    assert accuracy == 1.0


def test_user_errors_are_one_line(tmp_path, capsys):
    assert run_cli(main, ["--resume", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(argv) == 0


def test_distributed_data_parallel_on_cpu(tiny_dataset, tmp_path):
    run = tmp_path / "ddp"
    argv = _args(tiny_dataset, tmp_path, "--epochs", "1", "--run-dir", str(run), "--device", "cpu")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), argv), nprocs=2, join=True, start_method="spawn")
    stage = run / "nodule"
    # rank 0 alone wrote: one event file per split, one set of checkpoints
    assert len(_events(stage / "train")) == 1 and len(_events(stage / "val")) == 1
    checkpoint = load_checkpoint(stage / "last.pt")
    # both ranks' shares count: the epoch's 16 samples
    assert checkpoint["samples_seen"] == 16
    assert sorted(p.name for p in stage.iterdir() if p.is_file()) == ["best.pt", "last.pt"]


def test_data_parallel_path_scales_batch_and_saves_plain_keys(tiny_dataset, tmp_path, monkeypatch, capsys):
    # nn.DataParallel without GPUs runs the module in-process: the logic (batch
    # scaling, wrapping, unwrapped checkpoints) is what this checks on a CPU.
    from luna.devices import Devices
    from luna.training import app

    devices = Devices(torch.device("cpu"), data_parallel=2)
    assert devices.batch_size(8) == 16
    assert isinstance(devices.wrap(torch.nn.Linear(2, 2)), torch.nn.DataParallel)
    monkeypatch.setattr(app.Devices, "setup", classmethod(lambda cls, device=None, amp=False: devices))
    run = tmp_path / "dp"
    assert main(_args(tiny_dataset, tmp_path, "--epochs", "1", "--run-dir", str(run))) == 0
    assert "| 16 samples" in capsys.readouterr().out
    state = load_checkpoint(run / "nodule" / "last.pt")["model_state"]
    assert not any(key.startswith("module.") for key in state)


def test_segmentation_stage_trains_validates_and_checkpoints(tiny_dataset, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "seg"
    argv = ["--stage", "segmentation", "--data-dir", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
            "--batch-size", "8", "--epoch-size", "16", "--num-workers", "0", "--val-stride", "2",
            "--no-progress", "--epochs", "1", "--run-dir", str(run), "--augment"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[segmentation] epoch 1/1 val" in out and "nodule rec" in out
    checkpoint = load_checkpoint(run / "segmentation" / "best.pt")
    assert checkpoint["model_name"] == "SegmentationUNet" and checkpoint["samples_seen"] == 16
    val = checkpoint["metrics"]["val"]
    for key in ["precision", "recall", "dice", "nodule_recall", "fp_per_scan", "score"]:
        assert np.isfinite(val[key]), key
    # the epoch's operating threshold, chosen on the validation scans, goes with the model
    assert checkpoint["operating_threshold"] == val["threshold"] and val["threshold"] in OPERATING_THRESHOLDS
    model = build_model_from_checkpoint(checkpoint).eval()
    assert model(torch.zeros(1, 7, 32, 32)).shape == (1, 1, 32, 32)
    events = EventAccumulator(str(run / "segmentation" / "val"), size_guidance={"images": 0}).Reload()
    assert "nodule_recall" in events.Tags()["scalars"]
    assert any(tag.startswith("overlay") for tag in events.Tags()["images"])


def test_all_stages_in_order_and_malignancy_fine_tunes_the_nodule_classifier(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "all"
    argv = ["--data-dir", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"), *FAST,
            "--epochs", "1", "--run-dir", str(run)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    order = [out.index(f"[{name}] epoch 1/1 train") for name in ("segmentation", "nodule", "malignancy")]
    assert order == sorted(order)
    assert "diameter AUC" in out and "--malignancy-path" in out
    # without --lr each stage starts from its own rate: the nodule classifier's is higher
    for name, lr in (("segmentation", 3e-4), ("nodule", 1e-3), ("malignancy", 3e-4)):
        assert load_checkpoint(run / name / "last.pt")["optimizer_state"]["param_groups"][0]["initial_lr"] == lr
    nodule = load_checkpoint(run / "nodule" / "best.pt")["model_state"]
    malignancy = load_checkpoint(run / "malignancy" / "best.pt")
    assert malignancy["args"]["malignancy"]["finetune"] == str(run / "nodule" / "best.pt")
    assert 0.0 <= malignancy["metrics"]["val"]["diameter_auc"] <= 1.0
    # the diameter-only baseline fitted on the training nodules goes with the model
    rule = malignancy["diameter_rule"]
    assert rule["slope_per_mm"] > 0 and 0 < rule["midpoint_mm"] < 100
    state = malignancy["model_state"]
    # --finetune-depth 2: head and block4 trained, the rest exactly as the nodule stage left it; the
    # nodule classifier is the size-aware model's CNN (luna.models.malignancy)
    assert malignancy["model_name"] == "SizeAwareClassifier"
    torch.testing.assert_close(state["cnn.block1.conv1.weight"], nodule["block1.conv1.weight"], rtol=0, atol=0)
    # (the default classifier, ResidualClassifier: frozen batch norms keep their statistics)
    torch.testing.assert_close(state["cnn.input_batchnorm.running_mean"], nodule["input_batchnorm.running_mean"],
                               rtol=0, atol=0)
    torch.testing.assert_close(state["cnn.block1.bn1.running_var"], nodule["block1.bn1.running_var"], rtol=0, atol=0)
    assert not torch.equal(state["cnn.head.weight"], nodule["head.weight"])
    assert not torch.equal(state["cnn.block4.conv1.weight"], nodule["block4.conv1.weight"])


def test_malignancy_alone_needs_a_nodule_checkpoint(tiny_dataset, tmp_path, capsys):
    argv = ["--stage", "malignancy", "--data-dir", str(tiny_dataset), "--cache-dir", str(tmp_path / "c"), *FAST,
            "--run-dir", str(tmp_path / "run")]
    assert run_cli(main, argv) == 2
    assert "--finetune PATH" in capsys.readouterr().err


def test_nodule_stage_trains_on_proposals_and_validates_end_to_end(tiny_dataset, tmp_path, capsys, caplog):
    """With a segmentation model the stage adds its false proposals as hard negatives, validates the
    rest of the pipeline on the validation scans' proposals, and picks best.pt by that CPM."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from luna.models import SegmentationUNet, make_checkpoint, save_checkpoint

    torch.manual_seed(0)
    seg = SegmentationUNet(in_channels=7, depth=2, wf=2)
    seg_path = save_checkpoint(tmp_path / "seg.pt", {**make_checkpoint(seg, stage="segmentation"),
                                                     "operating_threshold": 0.8})
    run = tmp_path / "run"
    argv = _args(tiny_dataset, tmp_path, "--epochs", "1", "--run-dir", str(run), "--segmentation-path", str(seg_path),
                 "--hard-negatives", "0.5")
    caplog.set_level("INFO", logger="luna")
    assert main(argv) == 0
    assert "hard negatives" in caplog.text and "CPM" in capsys.readouterr().out
    assert "at p > 0.8 and" in caplog.text  # the segmentation's stored operating threshold
    checkpoint = load_checkpoint(run / "nodule" / "best.pt")
    assert checkpoint["metrics"]["score_name"] == "cpm"
    assert checkpoint["search_budget"] == SEARCH_BUDGET  # it trained on faint blobs: the diagnosis proposes them
    val = checkpoint["metrics"]["val"]
    for key in ("cpm", "sensitivity_at_1", "sensitivity_at_4", "fp_per_scan", "proposal_recall", "auc"):
        assert np.isfinite(val[key]), key
    assert 0.0 <= val["cpm"] <= 1.0 and val["fp_per_scan"] >= 0
    events = EventAccumulator(str(run / "nodule" / "val")).Reload()
    assert {"end_to_end/cpm", "end_to_end/sensitivity_at_1", "end_to_end/fp_per_scan"} <= set(events.Tags()["scalars"])
    # a second run segments nothing: the proposals come from the cache
    assert main(argv[:-6] + ["--run-dir", str(tmp_path / "run2"), "--segmentation-path", str(seg_path)]) == 0


def test_the_nodule_stage_draws_tubes_where_the_labels_allow_and_malignancy_does_not(tiny_dataset, tmp_path,
                                                                                     monkeypatch):
    """``--tubes`` reaches the nodule stage's training batches with each chunk's label and nodule diameter
    (`luna.data.tubes`); validation and the malignancy stage never see a tube."""
    from luna.data.tubes import TubeDistractors

    calls = []
    original = TubeDistractors.forward

    def spy(self, chunks, labels, diameter_mm, return_params=False):
        out, params = original(self, chunks, labels, diameter_mm, return_params=True)
        calls.append((self.share, labels.clone(), diameter_mm.clone(), params["drawn"].clone()))
        return (out, params) if return_params else out

    monkeypatch.setattr(TubeDistractors, "forward", spy)
    run = tmp_path / "run"
    assert main(_args(tiny_dataset, tmp_path, "--epochs", "1", "--run-dir", str(run), "--tubes", "0.75")) == 0
    assert calls and all(share == 0.75 for share, *_ in calls)
    labels = torch.cat([c[1] for c in calls])
    diameters = torch.cat([c[2] for c in calls])
    assert len(labels) == 16  # the training epoch only
    assert bool((diameters[labels == 1] > 0).all()) and bool((diameters[labels == 0] == 0).all())
    assert 0 < int(torch.cat([c[3] for c in calls]).sum()) < 16
    calls.clear()
    assert main(["--stage", "malignancy", "--data-dir", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
                 *FAST, "--epochs", "1", "--run-dir", str(tmp_path / "mal"),
                 "--finetune", str(run / "nodule" / "best.pt")]) == 0
    assert calls == []


def test_each_stage_has_its_own_epoch_size_unless_given():
    from types import SimpleNamespace

    from luna.training.classification import MalignancyStage, NoduleStage
    from luna.training.config import LoopConfig
    from luna.training.segmentation import SegmentationStage
    from luna.training.stage import Stage

    def size(cls, given):
        return Stage.epoch_size.fget(SimpleNamespace(loop=LoopConfig(epoch_size=given),
                                                     default_epoch_size=cls.default_epoch_size))

    # the nodule classifier draws twice the samples (its docstring: held-out CPM 0.773 -> 0.854)
    assert [size(cls, None) for cls in (SegmentationStage, NoduleStage, MalignancyStage)] == [2048, 4096, 2048]
    assert [size(cls, 16) for cls in (SegmentationStage, NoduleStage, MalignancyStage)] == [16, 16, 16]
    assert size(NoduleStage, 0) is None  # 0: each positive about once (BalancedSampler's own size)
