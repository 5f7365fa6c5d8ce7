"""Every protocol end to end on a tiny JPEG ImageFolder through the real DALI CPU pipeline.

3 classes of stripe orientations, 32 px views, a ResNet-18 checkpoint in the trainer's
format. Orientation survives the high-pass, so even random-init features separate the
classes: kNN and a (precomputed) linear probe must be far above chance (33 %).
"""
import argparse
import json
import os
from pathlib import Path

import pytest

from eval_testdata import make_checkpoint, make_image_folder
from mscn.cli import main as mscn_main
from mscn.data.subset import make_subset
from mscn.errors import ConfigError
from mscn.train.eval.cli import add_eval_commands
from mscn.train.eval.pretrained import HighPassMismatchWarning


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    make_image_folder(d / "train", per_class=12)
    make_image_folder(d / "val", per_class=6, seed=1)
    make_subset(d / "train", 0.5, seed=0, out=d / "half.txt")  # 18 labelled images
    return {"dir": d, "ckpt": str(make_checkpoint(d / "ck.pt")), "train": str(d / "train"),
            "val": str(d / "val"), "subset": str(d / "half.txt")}


def _run(*argv):
    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    args.func(args)


def _common(data, out, *extra):
    return ["--ckpt", data["ckpt"], "--train-root", data["train"], "--val-root", data["val"],
            "--out", str(out), "--batch", "16", "--device", "cpu", *extra]


def _result(out):
    r = json.loads((out / "result.json").read_text())
    assert 0 <= r["top1"] <= r["top5"] <= 100 and r["n_val"] == 18 and r["num_classes"] == 3
    assert (out / "result.md").read_text().startswith("| Method |")
    return r


def test_linear_probe_with_augmented_views(data, tmp_path):
    out = tmp_path / "runs" / "linear"
    _run("linear", *_common(data, out, "--epochs", "2"))
    r = _result(out)
    assert r["protocol"] == "linear" and r["name"] == "SimCLR+MSCN" and r["epochs"] == 2
    s = r["settings"]
    assert s["precompute"] is False and s["lr"] == pytest.approx(1.0 * 16 / 256) and s["weight_decay"] == 1e-6
    assert (tmp_path / "runs" / "results.csv").read_text().count("\n") == 2  # header + this run


def test_precomputed_probe_and_knn_beat_chance(data, tmp_path):
    _run("linear", *_common(data, tmp_path / "lin", "--epochs", "30", "--lr", "4", "--precompute"))
    lin = _result(tmp_path / "lin")
    assert lin["settings"]["train_views"] == "center-crop (precomputed)"
    assert lin["top1"] > 80
    _run("knn", *_common(data, tmp_path / "knn"))
    knn = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert knn["settings"] == {"k": 20, "temperature": 0.07, "batch": 16}
    assert knn["n_train"] == 36 and knn["n_val"] == 18 and knn["top1"] > 80
    assert knn["k"] == 20


def test_knn_k_above_the_training_set_is_said(data, tmp_path, capsys):
    _run("knn", *_common(data, tmp_path / "knn", "--k", "50"))
    knn = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert knn["k"] == 36 and knn["settings"]["k"] == 50  # voted vs asked for
    assert "knn: --k 50 is more than the 36 training samples" in capsys.readouterr().err


def test_transfer_uses_its_lr_and_dataset_name(data, tmp_path):
    _run("transfer", *_common(data, tmp_path / "tr", "--epochs", "1", "--lr", "0.3", "--dataset", "stripes"))
    r = _result(tmp_path / "tr")
    assert r["protocol"] == "transfer" and r["dataset"] == "stripes" and r["settings"]["base_lr"] == 0.3
    assert "Transfer stripes" in (tmp_path / "tr" / "result.md").read_text()


def test_finetune_and_from_scratch_then_report(data, tmp_path):
    _run("finetune", *_common(data, tmp_path / "ft", "--epochs", "2", "--subset", data["subset"]))
    _run("finetune", *_common(data, tmp_path / "ft0", "--epochs", "2", "--subset", data["subset"], "--from-scratch"))
    ft, ft0 = _result(tmp_path / "ft"), _result(tmp_path / "ft0")
    assert ft["label_fraction"] == pytest.approx(0.5) and ft["n_labelled"] == 18
    s = ft["settings"]
    assert s["backbone_lr"] == pytest.approx(0.002 * 16 / 256) and s["head_lr"] == pytest.approx(0.5 * 16 / 256)
    assert s["milestones"] == [1, 2] and s["weight_decay"] == 0.0  # 12/20 and 16/20 of 2 epochs
    assert ft0["name"] == "from scratch"
    _run("report", str(tmp_path), "--out", str(tmp_path / "table.md"))
    table = (tmp_path / "table.md").read_text()
    assert "| Label fraction | 50% |" in table and "| from scratch |" in table and "| SimCLR+MSCN |" in table


def test_results_record_what_was_scored_and_report_keeps_a_retrained_checkpoint_apart(data, tmp_path, monkeypatch,
                                                                                         capsys):
    """A result records the weights, data and subset it scored, not only their paths: a run
    retrained into the same folder, or a subset rewritten in place, gives another row (they
    replaced the older result with the note "same settings"). Relative paths typed in another
    folder are recorded absolute, so the same evaluation is the same result."""
    import shutil

    ck = tmp_path / "run" / "final.pt"
    ck.parent.mkdir()
    shutil.copy(data["ckpt"], ck)
    sub = tmp_path / "sub.txt"
    shutil.copy(data["subset"], sub)
    base = ["--train-root", data["train"], "--val-root", data["val"], "--batch", "16", "--device", "cpu"]
    _run("knn", "--ckpt", str(ck), "--out", str(tmp_path / "ev" / "a"), *base)
    first = json.loads((tmp_path / "ev" / "a" / "result.json").read_text())
    assert len(first["weights"]) == 16 and first["train_root"] == data["train"] and first["val_root"] == data["val"]
    assert first["train_data"] != first["val_data"] and first["out"] == str(tmp_path / "ev" / "a")
    # the same evaluation typed with relative paths from another folder: the same settings
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")
    rel = [os.path.relpath(p) for p in (ck, data["train"], data["val"])]
    _run("knn", "--ckpt", rel[0], "--out", "../../ev/b", "--train-root", rel[1], "--val-root", rel[2],
         "--batch", "16", "--device", "cpu")
    second = json.loads((tmp_path / "ev" / "b" / "result.json").read_text())
    assert {k: second[k] for k in ("weights", "train_root", "val_root", "train_data", "val_data", "top1")} == \
        {k: first[k] for k in ("weights", "train_root", "val_root", "train_data", "val_data", "top1")}
    assert second["out"] == str(tmp_path / "ev" / "b")
    # retrained into the same folder: other weights at the same path and step
    make_checkpoint(ck, seed=1)
    _run("knn", "--ckpt", str(ck), "--out", str(tmp_path / "ev" / "c"), *base)
    third = json.loads((tmp_path / "ev" / "c" / "result.json").read_text())
    assert third["weights"] != first["weights"] and third["ckpt_file"] == first["ckpt_file"]
    capsys.readouterr()
    _run("report", str(tmp_path / "ev"), "--out", str(tmp_path / "table.md"))
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| SimCLR+MSCN")]
    assert sorted(rows) == sorted([f"| SimCLR+MSCN (weights={first['weights'][:8]}) | {first['top1']:.1f} |",
                                   f"| SimCLR+MSCN (weights={third['weights'][:8]}) | {third['top1']:.1f} |"]), rows
    assert capsys.readouterr().err.count("replaces an older result with the same settings") == 1  # b replaces a
    # a subset rewritten in place between two fine-tunings: two rows, and the losses kept
    monkeypatch.chdir(tmp_path)
    for out, seed in (("f1", 0), ("f2", 1)):
        make_subset(data["train"], 0.5, seed=seed, out=sub)
        _run("finetune", "--ckpt", str(ck), "--out", str(tmp_path / "ft" / out), "--epochs", "1", "--subset",
             "sub.txt", *base)
    f1, f2 = (json.loads((tmp_path / "ft" / o / "result.json").read_text()) for o in ("f1", "f2"))
    assert f1["settings"]["subset"] == f2["settings"]["subset"] == str(sub)
    assert f1["settings"]["subset_data"] != f2["settings"]["subset_data"] and len(f1["loss"]) == 1
    _run("report", str(tmp_path / "ft"), "--out", str(tmp_path / "ft.md"))
    assert sum(line.startswith("| SimCLR+MSCN (subset_data=") for line in
               (tmp_path / "ft.md").read_text().splitlines()) == 2


def test_highpass_mismatch_and_wrong_arch_through_the_cli(data, tmp_path, capsys):
    with pytest.warns(HighPassMismatchWarning):
        _run("knn", *_common(data, tmp_path / "k", "highpass.sigma=2.0"))
    with pytest.raises(ConfigError, match="high-pass"):
        _run("knn", *_common(data, tmp_path / "k", "--strict", "highpass.sigma=2.0"))
    capsys.readouterr()  # the runs above (their progress bars): this call's lines only
    rc = mscn_main(["eval", "knn", *_common(data, tmp_path / "k", "--arch", "resnet50")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "holds a resnet18 backbone but resnet50" in err[0]


def test_probe_same_seed_same_result_another_seed_differs(data, tmp_path):
    """Random crops, flips, data order and head init all follow --seed."""
    runs = {}
    for tag, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        _run("linear", *_common(data, tmp_path / tag, "--epochs", "2", "--seed", seed))
        runs[tag] = _result(tmp_path / tag)
    assert runs["a"]["seed"] == 3 and runs["c"]["seed"] == 4
    assert (runs["a"]["top1"], runs["a"]["loss"]) == (runs["b"]["top1"], runs["b"]["loss"])
    assert runs["c"]["loss"] != runs["a"]["loss"]


def test_probe_loss_falls_at_the_default_lr_on_large_features(data, tmp_path):
    """Pooled features x50 (a scale trained backbones reach): the bare linear head
    diverged at the default lr; behind the non-affine BatchNorm every epoch's loss falls."""
    import torch

    big = tmp_path / "big.pt"
    ck = torch.load(data["ckpt"], weights_only=False)
    for k in ("layer4.1.bn2.weight", "layer4.1.bn2.bias"):
        ck["backbone"][k] = ck["backbone"][k] * 50
    torch.save(ck, big)
    _run("linear", *_common(data | {"ckpt": str(big)}, tmp_path / "p", "--epochs", "5", "--precompute",
                            "--seeds", "2"))
    r = _result(tmp_path / "p")
    assert r["seeds"] == 2 and [x["seed"] for x in r["runs"]] == [0, 1] and r["top1_std"] >= 0
    for run in r["runs"]:
        assert all(b < a for a, b in zip(run["loss"], run["loss"][1:])), run["loss"]


def test_a_run_directory_is_scored_at_its_newest_step_and_the_result_says_which(data, tmp_path, capsys):
    import shutil

    import torch

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name, step in (("final.pt", 45), ("checkpoints/ckpt_00000054.pt", 54)):
        ck = torch.load(data["ckpt"], weights_only=True)
        ck["step"] = step
        torch.save(ck, run / name)
    _run("knn", *_common(data | {"ckpt": str(run)}, tmp_path / "k"))
    r = json.loads((tmp_path / "k" / "result.json").read_text())
    assert r["ckpt"] == str(run) and r["ckpt_step"] == 54
    assert r["ckpt_file"] == str((run / "checkpoints" / "ckpt_00000054.pt").resolve())
    assert "is newer than final.pt (step 45)" in capsys.readouterr().out
    shutil.rmtree(run / "checkpoints")
    _run("knn", *_common(data | {"ckpt": str(run)}, tmp_path / "k"))
    r = json.loads((tmp_path / "k" / "result.json").read_text())
    assert (r["ckpt_file"], r["ckpt_step"]) == (str((run / "final.pt").resolve()), 45)
    assert f"[mscn] {run}: evaluating {run / 'final.pt'} (step 45)" in capsys.readouterr().out  # which file, always


def test_knn_on_a_val_subset_of_the_classes(data, tmp_path):
    import shutil

    val = tmp_path / "val"
    shutil.copytree(f"{data['val']}/c2", val / "c2")  # alone, its folder index would be 0
    _run("knn", *_common(data | {"val": str(val)}, tmp_path / "k"))
    r = json.loads((tmp_path / "k" / "result.json").read_text())
    assert r["n_val"] == 6 and r["top1"] > 80


def test_subset_labels_must_be_the_class_indices_of_their_folders(data, tmp_path):
    """A subset list whose labels are words, or indices that contradict the class folders,
    is one error naming the line or the file, not a training run on wrong labels."""
    from mscn.errors import DataError
    from mscn.train.eval.finetune import read_subset

    lines = Path(data["subset"]).read_text().splitlines()
    assert read_subset(data["subset"], data["train"])  # the list mscn data subset wrote
    rel, label = lines[0].rsplit(" ", 1)
    words = tmp_path / "words.txt"
    words.write_text(f"{rel} zero\n")
    with pytest.raises(DataError, match=r"words.txt:1: expected 'relative/path label' with a class index"):
        read_subset(words, data["train"])
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("\n".join([f"{rel} {(int(label) + 1) % 3}", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=rf"{rel} is labelled {(int(label) + 1) % 3} .* folder of class {label}"):
        read_subset(wrong, data["train"])
    # a list of bare file names with a space in the first one is still an official split
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("my photo.jpg\n")
    with pytest.raises(DataError, match="none of its 1 names matches"):  # read as names, matched by stem
        read_subset(spaced, data["train"])
    binary = tmp_path / "random.pt"
    binary.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(DataError, match=r"random.pt: not a UTF-8 text file \(byte 0\)"):
        read_subset(binary, data["train"])
    with pytest.raises(DataError, match=r"--subset .*: a folder; it takes the subset file"):
        read_subset(tmp_path, data["train"])
    # shards or a scan list as the train root: the subset's files are read from their image folder
    from mscn.data.pack import pack
    from mscn.data.scan import scan

    pack(data["train"], tmp_path / "packed", shard_size=8, progress=False, workers=1)
    with pytest.raises(DataError, match=r"--train-root .*packed: a folder of .tar shards; fine-tuning on a label "
                                        r"subset reads the images from their ImageFolder: pass that folder \(these "
                                        r"shards were packed from .*train\)"):
        read_subset(data["subset"], tmp_path / "packed")
    scan(data["train"], out=tmp_path / "t.txt", report=tmp_path / "t.scan.json", progress=False, workers=1)
    with pytest.raises(DataError, match=r"--train-root .*t.txt: a file list; .*\(this list was scanned from .*train\)"):
        read_subset(data["subset"], tmp_path / "t.txt")
    # a list made for another root: its fix is a list for this root, not a rescan of it
    with pytest.raises(DataError, match=r"missing file .*relative to --train-root .*write one for this root "
                                        r"\(mscn data subset .*val --fraction"):
        read_subset(data["subset"], data["val"])


def test_outputs_that_cannot_be_written_are_refused_before_the_evaluation(data, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    assert mscn_main(["eval", "knn", *_common(data, tmp_path / "afile")]) == 2
    assert "--out " in capsys.readouterr().err
    assert mscn_main(["eval", "knn", *_common(data, tmp_path / "o", "--table", str(tmp_path / "adir"))]) == 2
    err = capsys.readouterr().err
    assert "--table " in err and "a folder" in err and not (tmp_path / "o").exists()  # nothing written


def test_default_out_of_a_checkpoint_during_training_has_its_step(data, tmp_path, monkeypatch, capsys):
    """Scored while it trains and once it is done: two folders, so two rows in the report."""
    import torch

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "myrun"
    (run / "checkpoints").mkdir(parents=True)
    ck = torch.load(data["ckpt"], weights_only=True)
    ck["step"] = 30
    torch.save(ck, run / "checkpoints" / "ckpt_00000030.pt")
    common = ["--train-root", data["train"], "--val-root", data["val"], "--batch", "16", "--device", "cpu"]
    _run("knn", "--ckpt", str(run), *common)
    err = capsys.readouterr().err  # the feature passes are not silent (ImageNet: minutes)
    assert "kNN features, train" in err and "kNN features, val" in err
    ck["step"] = 60
    torch.save(ck, run / "final.pt")
    _run("knn", "--ckpt", str(run), *common)
    assert json.loads(Path("runs/eval/myrun-step30-knn/result.json").read_text())["ckpt_step"] == 30
    assert json.loads(Path("runs/eval/myrun-knn/result.json").read_text())["ckpt_step"] == 60


def test_overrides_on_both_sides_of_an_option(capsys):
    """``mscn eval knn a=1 --ckpt X b=2``: argparse leaves the second group over under
    sub-commands; both reach the overrides, in order, and a stray option is still refused."""
    from mscn.cli import parse

    args = parse(["eval", "knn", "data.num_threads=1", "--ckpt", "x.pt", "eval.knn_k=5", "--device", "cpu",
                  "views.0.mask.ratio=0.1"])
    assert args.overrides == ["data.num_threads=1", "eval.knn_k=5", "views.0.mask.ratio=0.1"]
    assert (args.ckpt, args.device) == ("x.pt", "cpu")
    assert parse(["config", "--config", "demo", "train.seed=3"]).overrides == ["train.seed=3"]
    for argv in (["eval", "knn", "--ckpt", "x", "--bogus"], ["eval", "report", "r.json", "--out", "t.md", "a=1"]):
        with pytest.raises(SystemExit):
            parse(argv)
        # told by the sub-command: its usage and its name, not `mscn [-h] [--version] COMMAND`
        err = capsys.readouterr().err
        assert f"mscn eval {argv[1]}: error: unrecognized arguments: " in err and "COMMAND ..." not in err, err


def test_a_missing_root_is_named_by_its_flag(data, tmp_path):
    from mscn.errors import MscnError

    for flag in ("--train-root", "--val-root"):
        argv = _common(data, tmp_path / "k")
        argv[argv.index(flag) + 1] = str(tmp_path / "nope")
        with pytest.raises(MscnError, match=f"eval knn: {flag} {tmp_path / 'nope'}: no such file or directory"):
            _run("knn", *argv)


def test_an_unlabelled_val_root_is_refused_not_scored_zero(data, tmp_path):
    import shutil

    from mscn.errors import DataError

    flat = tmp_path / "flat"
    flat.mkdir()
    for img in sorted(Path(data["val"], "c0").iterdir())[:4]:
        shutil.copy(img, flat / img.name)
    with pytest.raises(DataError, match="flat: has no labels"):
        _run("knn", *_common(data | {"val": str(flat)}, tmp_path / "k"))
    assert not (tmp_path / "k" / "result.json").exists()


def test_labels_outside_the_training_classes_are_named_not_scored(data, tmp_path):
    """A file list (or a shard's .cls) numbering its images past the training set's classes:
    kNN would score them 0 % and the probe fail in its loss; both name the data instead."""
    import shutil

    from mscn.errors import DataError

    val = tmp_path / "val"
    shutil.copytree(data["val"], val)
    lines = [f"{p.relative_to(val).as_posix()} {7 if p.parent.name == 'c2' else int(p.parent.name[1:])}"
             for p in sorted(val.rglob("*.jpg"))]
    (val / "list.txt").write_text("\n".join(lines) + "\n")
    for protocol, extra in (("knn", ()), ("linear", ("--epochs", "1", "--precompute")), ("linear", ("--epochs", "1"))):
        # the list has no scan report (class names): its numbers are the training classes', and
        # the loader names the first label past them before anything is read
        with pytest.raises(DataError, match=r"val/list.txt: label 7 \(c2/000.jpg\) is outside the 3 classes of "
                                            r"the training set \(0-2\)"):
            _run(protocol, *_common(data | {"val": str(val / "list.txt")}, tmp_path / protocol, *extra))
    # a shard's .cls is read only with the sample: kNN and the probe name it there
    import io
    import tarfile

    from mscn.data.pack import pack
    from mscn.data.shardindex import write_dali_index

    pack(val, tmp_path / "wds", shard_size=64, progress=False, workers=1, shuffle_seed=None)
    (tmp_path / "wds" / "sources.json").unlink()  # shards packed elsewhere: no class names
    for tar_path in (tmp_path / "wds").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
        with tarfile.open(tar_path, "w") as tar:
            for m, body in members:
                if m.name.endswith(".cls") and body.strip() == b"2":
                    body = b"7"
                    m.size = len(body)
                tar.addfile(m, io.BytesIO(body))
        write_dali_index(tar_path, tar_path.with_suffix(".idx"))
    for protocol, extra in (("knn", ()), ("linear", ("--epochs", "1", "--precompute")), ("linear", ("--epochs", "1"))):
        with pytest.raises(DataError, match=r"wds: (label\(s\) 7 that no training sample has|a sample "
                                            r"labelled 7, outside the 3 classes)"):
            _run(protocol, *_common(data | {"val": str(tmp_path / "wds")}, tmp_path / f"w{protocol}{len(extra)}", *extra))


def test_a_probe_batch_larger_than_the_training_set_is_refused_with_or_without_precompute(data, tmp_path):
    """36 training images, --batch 64: the image loop refused it, the precomputed probe trained
    one batch of 36 per epoch at the lr of batch 64 and reported a result; both refuse now."""
    from mscn.errors import DataError

    for extra in (("--precompute",), ()):
        args = [*_common(data, tmp_path / f"b{len(extra)}", "--epochs", "1", *extra)]
        args[args.index("--batch") + 1] = "64"
        with pytest.raises(DataError, match="36 images, fewer than one global batch of 64 for one training batch"):
            _run("linear", *args)
        assert not (tmp_path / f"b{len(extra)}" / "result.json").exists()


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_sigterm_during_an_evaluation_is_one_line(data, tmp_path, protocol):
    """timeout or a scheduler's SIGTERM ended `mscn eval` with status 143 and not a word;
    Ctrl-C printed one line. Now SIGTERM does too, and says nothing was written."""
    import os
    import signal
    import subprocess
    import sys

    extra = ["--subset", data["subset"]] if protocol == "finetune" else []
    cmd = [sys.executable, "-m", "mscn", "eval", protocol, *_common(data, tmp_path / "o", "--epochs", "500"), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:  # an epoch's JSON line: the evaluation is under way
            if '"epoch": 1' in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines() == [f"mscn: stopped by SIGTERM during eval {protocol}; it writes its result when "
                                        "it ends, so nothing was written: rerun it"], err[-2000:]
    assert not (tmp_path / "o" / "result.json").exists()


def test_a_bad_fine_tuning_lr_is_named_as_given(data, tmp_path):
    """--head-lr -1 was reported as -0.0625, the value after scaling by batch/256."""
    from mscn.errors import MscnError

    with pytest.raises(MscnError, match=r"head lr > 0 \(got 1, 16, 0.002, -1.0\)"):
        _run("finetune", *_common(data, tmp_path / "f", "--epochs", "1", "--subset", data["subset"], "--head-lr", "-1"))


def test_a_class_with_no_training_image_is_named(data, tmp_path):
    """kNN: a val class whose training folder is empty can never be voted for; the line names
    the class, not only a numbering mismatch."""
    import shutil

    from mscn.errors import DataError

    train = tmp_path / "train"
    shutil.copytree(data["train"], train)
    for f in (train / "c2").iterdir():
        f.unlink()
    small = ["--arch", "resnet18", "data.image_size=32", "data.val_resize=36"]
    with pytest.raises(DataError, match=r"label\(s\) 2 \('c2'\) that no training sample has: a class folder of "
                                        r"the training set with no image in it"):
        _run("knn", *_common(data | {"ckpt": "random", "train": str(train)}, tmp_path / "k", *small))


def test_the_same_data_for_train_and_val_is_said(data, tmp_path, capsys):
    """kNN over its own training images scores ~100 %: allowed, and said."""
    small = ["--arch", "resnet18", "data.image_size=32", "data.val_resize=36"]
    _run("knn", *_common(data | {"ckpt": "random", "val": data["train"]}, tmp_path / "k", *small))
    assert "note: --train-root and --val-root are the same data" in capsys.readouterr().out
    _run("knn", *_common(data | {"ckpt": "random"}, tmp_path / "k2", *small))
    assert "same data" not in capsys.readouterr().out


def test_random_init_names_the_recipe_it_took(data, tmp_path, capsys):
    small = ["--arch", "resnet18", "data.image_size=32", "data.val_resize=36"]
    _run("knn", *_common(data | {"ckpt": "random"}, tmp_path / "k", *small))
    assert "--ckpt random without --config: the default recipe (resnet18, 32 px views)" in capsys.readouterr().out
    _run("knn", *_common(data | {"ckpt": "random"}, tmp_path / "k2", "--config", "demo", *small))
    assert "without --config" not in capsys.readouterr().out


def test_no_precompute_overrides_a_recipe_that_precomputes(data, tmp_path):
    """The demo recipe (which its checkpoints carry) precomputes: --no-precompute is the A.2
    probe with random crops; with neither flag the recipe decides."""
    demo = ["--config", "demo", "--arch", "resnet18", "data.image_size=32", "data.val_resize=36", "--epochs", "1"]
    for flag, want in ((None, True), ("--no-precompute", False), ("--precompute", True)):
        out = tmp_path / str(flag)
        _run("linear", *_common(data | {"ckpt": "random"}, out, *demo, *([flag] if flag else [])))
        s = json.loads((out / "result.json").read_text())["settings"]
        assert s["precompute"] is want and (s["train_views"] == "center-crop (precomputed)") is want, flag


def test_an_evaluation_runs_under_the_stall_watch(data, tmp_path, capsys):
    """``mscn eval`` says when it stops moving (train.stall_warn_s, here set far below the
    time to build a loader), with its stacks under --out, and still finishes."""
    out = tmp_path / "knn"
    _run("knn", *_common(data, out, "train.stall_warn_s=0.001"))
    assert json.loads((out / "result.json").read_text())["n_val"] == 18
    said = capsys.readouterr().out
    assert f"[mscn] the evaluation has not moved for 0 s; its threads' stacks: {out / 'stalls' / 'rank0.txt'}" in said
    assert "[mscn] moving again: the pause in the evaluation took" in said
    assert "the evaluation" in (out / "stalls" / "rank0.txt").read_text()
