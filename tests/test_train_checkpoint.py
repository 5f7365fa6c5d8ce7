"""Checkpoints: round-trip, atomic writes, keep-last-K, skipping broken files, RNG state."""
import os
import random

import numpy as np
import pytest
import torch
import torchvision

from mscn.config import from_dict, load_config, to_dict
from mscn.errors import MscnError
from mscn.train import checkpoint as ckpt
from mscn.train.distributed import DistInfo
from mscn.train.lars import build_optimizer
from mscn.train.pretrain import build_model, train_step
from mscn.train.resume import checkpoint_state, load_state

def _checkpoint_state(cfg, net, opt, scaler, step, steps_per_epoch):
    return checkpoint_state(cfg, net, opt, scaler, step, steps_per_epoch, [{"rng": ckpt.rng_state()}])


SMALL = ["model.arch=resnet18", "model.proj_hidden=64", "model.proj_out=32", "model.pred_hidden=64"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained(method="byol", seed=0, steps=2):
    torch.manual_seed(seed)
    cfg = load_config(None, SMALL + [f"method.name={method}"])
    net, model = build_model(cfg, torch.device("cpu"), DistInfo())
    opt, _ = build_optimizer(cfg.optim, net, lr=0.2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    for step in range(steps):
        train_step(model, opt, scaler, views, None)
        net.after_optimizer_step(step, 10)
    return cfg, net, opt, scaler


def test_the_space_a_checkpoint_needs_is_its_file_size(tmp_path):
    """What a full disk's message says a checkpoint needs: its tensors, each storage once, as
    torch.save writes them (the backbone entry shares the model's tensors; counted twice, a
    ResNet-18 SimCLR checkpoint's need read 1.5 times its file)."""
    cfg, net, opt, scaler = trained("simclr")
    state = _checkpoint_state(cfg, net, opt, scaler, 7, 5)
    size = ckpt.save_checkpoint(state, tmp_path, keep_last=3).stat().st_size
    assert 0.97 * size < ckpt._state_bytes(state) <= size


def test_round_trip_restores_model_target_optimizer_and_metadata(tmp_path):
    cfg, net, opt, scaler = trained("byol")
    path = ckpt.save_checkpoint(_checkpoint_state(cfg, net, opt, scaler, 7, 5), tmp_path, keep_last=3)
    assert path.name == "ckpt_00000007.pt"
    state = ckpt.load_checkpoint(path)  # weights_only=True inside
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (7, 1, 2)
    assert state["arch"] == "resnet18" and state["method"] == "byol"
    assert from_dict(state["config"]) == cfg  # the plain-dict config rebuilds the same Config

    cfg2, net2, opt2, scaler2 = trained("byol", seed=1)
    load_state(state, str(path), cfg2, net2, opt2, scaler2)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), k  # online, target and BN buffers
    bufs = [s["momentum_buffer"] for s in opt.state.values()]
    bufs2 = [s["momentum_buffer"] for s in opt2.state.values()]
    assert len(bufs) == len(bufs2) > 0 and all(torch.equal(a, b) for a, b in zip(bufs, bufs2))

    # the eval suite's contract: "backbone" loads into torchvision with only fc missing
    ref = torchvision.models.resnet18(weights=None)
    res = ref.load_state_dict(state["backbone"], strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    assert torch.equal(ref.conv1.weight, net.backbone.conv1.weight)


def test_incompatible_checkpoint_is_one_clear_error(tmp_path):
    cfg, net, opt, scaler = trained("byol")
    path = ckpt.save_checkpoint(_checkpoint_state(cfg, net, opt, scaler, 1, 5), tmp_path, keep_last=1)
    cfg_s, net_s, opt_s, scaler_s = trained("simclr", steps=0)
    with pytest.raises(MscnError, match=r"belongs to another run \(differs in method\.name\)"):
        load_state(ckpt.load_checkpoint(path), str(path), cfg_s, net_s, opt_s, scaler_s)
    bigger = load_config(None, SMALL[:1] + ["model.proj_hidden=128", "method.name=byol"])
    net_b, _ = build_model(bigger, torch.device("cpu"), DistInfo())
    opt_b, _ = build_optimizer(bigger.optim, net_b, lr=0.1)
    with pytest.raises(MscnError, match=r"differs in model\.pred_hidden, model\.proj_hidden, model\.proj_out\)"):
        load_state(ckpt.load_checkpoint(path), str(path), bigger, net_b, opt_b, scaler)
    same_config = {**ckpt.load_checkpoint(path), "config": to_dict(bigger)}  # e.g. written by other code
    with pytest.raises(MscnError, match="does not fit this model") as err:
        load_state(same_config, str(path), bigger, net_b, opt_b, scaler)
    assert "size mismatch" in str(err.value) and str(err.value).endswith("or --resume none")  # whole, not cut


def test_keep_last_and_truncated_files_are_skipped(tmp_path):
    state = {"model": {"w": torch.arange(1000.0)}, "optimizer": {}, "config": {}, "arch": "resnet18",
             "method": "simclr", "backbone": {}}
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint({**state, "step": step}, tmp_path, keep_last=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == \
        ["ckpt_00000020.pt", "ckpt_00000030.pt", "ckpt_00000040.pt"]
    # a newer file cut in half (as a crash during a plain write would leave) and a
    # stray temporary file: both must be passed over
    good = ckpt.ckpt_path(tmp_path, 40).read_bytes()
    ckpt.ckpt_path(tmp_path, 50).write_bytes(good[: len(good) // 2])
    (tmp_path / ".ckpt_00000060.pt.tmp999").write_bytes(good)
    path, loaded = ckpt.find_latest_valid(tmp_path)
    assert path.name == "ckpt_00000040.pt" and loaded["step"] == 40
    with pytest.raises(MscnError, match=r"not a readable checkpoint \(a zip archive cut short \(\d+ bytes, no index"):
        ckpt.load_checkpoint(ckpt.ckpt_path(tmp_path, 50))
    assert ckpt.find_latest_valid(tmp_path / "nothing_here") is None


def test_a_checkpoint_with_bytes_flipped_inside_is_passed_over_and_a_read_error_is_not_set_aside(tmp_path, capsys,
                                                                                                  monkeypatch):
    """torch.load does not check the zip's CRC-32s: a checkpoint with 4 KiB flipped inside a
    tensor loaded, and the run resumed from the garbage (a NaN later blamed on the lr). A
    read error (EIO, a stale NFS handle) may pass: that file is left in place."""
    import errno

    state = {"model": {"w": torch.arange(100_000.0)}, "optimizer": {}, "config": {}, "arch": "resnet18",
             "method": "simclr", "backbone": {}}
    for step in (10, 20):
        ckpt.save_checkpoint({**state, "step": step}, tmp_path, keep_last=3)
    newest = ckpt.ckpt_path(tmp_path, 20)
    data = bytearray(newest.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 1 for b in data[mid:mid + 4096])
    newest.write_bytes(data)
    with pytest.raises(MscnError, match=r"ckpt_00000020.pt: not a readable checkpoint \(damaged: \S+/data/\d+ "
                                        r"fails its checksum; the file changed after it was written\)"):
        ckpt.load_checkpoint(newest)
    path, loaded = ckpt.find_latest_valid(tmp_path, set_aside=True)
    assert path.name == "ckpt_00000010.pt" and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert "set aside as ckpt_00000020.pt.unreadable" in capsys.readouterr().out
    # an I/O error while reading: skipped for now, not renamed out of the run
    ckpt.save_checkpoint({**state, "step": 30}, tmp_path, keep_last=3)
    real = ckpt.zipfile.ZipFile

    def eio(path, *a, **kw):
        if str(path).endswith("ckpt_00000030.pt"):
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *a, **kw)

    monkeypatch.setattr(ckpt.zipfile, "ZipFile", eio)
    path, _ = ckpt.find_latest_valid(tmp_path, set_aside=True)
    out = capsys.readouterr().out
    assert path.name == "ckpt_00000010.pt" and "ckpt_00000030.pt: cannot be read (Input/output error); left in " \
        "place" in out, out
    assert ckpt.ckpt_path(tmp_path, 30).is_file()
    monkeypatch.undo()
    assert ckpt.find_latest_valid(tmp_path, set_aside=True)[0].name == "ckpt_00000030.pt"  # it reads again
    # saved without checksums (torch's compute_crc32=False writes zeros): loads, not set aside
    from torch.utils.serialization import config as serialization

    before = serialization.save.compute_crc32
    serialization.save.compute_crc32 = False
    try:
        ckpt.save_checkpoint({**state, "step": 40}, tmp_path, keep_last=3)
    finally:
        serialization.save.compute_crc32 = before
    assert ckpt.find_latest_valid(tmp_path, set_aside=True)[0].name == "ckpt_00000040.pt"


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "final.pt"
    ckpt.atomic_save({"step": 1}, target)
    with pytest.raises(Exception):
        ckpt.atomic_save({"step": 2, "bad": lambda: None}, target)  # fails mid-pickle
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["final.pt"]


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "ckpt_00000001.pt"
    torch.save({"model": {}, "obj": object()}, path)  # a pickle that weights_only will not run
    with pytest.raises(MscnError, match="not a readable checkpoint") as e:
        ckpt.load_checkpoint(path)
    # torch's own advice (load with weights_only=False: run the file's code) is not repeated
    assert "weights_only=False" not in str(e.value).replace("never loads a checkpoint with weights_only=False", "")
    assert "not a file mscn pretrain wrote" in str(e.value) and "\n" not in str(e.value)
    # files that are no torch file at all are called that, not torch's KeyError or opcode
    for junk in (b"\xff\xd8\xff\xe0 a JPEG, not a checkpoint", b"hello world\n"):
        path.write_bytes(junk)
        with pytest.raises(MscnError, match=r"not a torch checkpoint: it does not start as a zip archive or a pickle"):
            ckpt.load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(MscnError, match=r"not a readable checkpoint \(an empty file\)"):
        ckpt.load_checkpoint(path)


def test_torchs_warning_on_a_file_that_fails_is_not_printed_above_the_error(tmp_path, monkeypatch):
    """A pickle of protocol 4 (not a torch file): torch warns "Detected pickle protocol 4 ...
    please file an issue" and then fails. The one line says what the file is; the warning,
    with its advice and a source line of torch's, is dropped. A file that loads keeps it."""
    import pickle
    import warnings

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"step": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MscnError, match="not a readable checkpoint"):
            ckpt.load_checkpoint(path)
        assert ckpt.step_of(path) is None and not ckpt.opens(path)
    assert [str(w.message) for w in caught] == []
    # a warning from a load that succeeds still reaches the user
    real_load = torch.load

    def warning_load(*a, **k):
        warnings.warn("torch says something", UserWarning)
        return real_load(*a, **k)

    torch.save({"step": 1}, path)
    monkeypatch.setattr(torch, "load", warning_load)
    with pytest.warns(UserWarning, match="torch says something"):
        assert ckpt.load_checkpoint(path, required=("step",)) == {"step": 1}


def test_a_read_only_checkpoint_folder_is_not_told_to_free_space(tmp_path, monkeypatch):
    """A write refused for another reason than space (read-only, no permission): the line
    says to make the folder writable, not to free space."""
    import builtins
    import errno

    old = ckpt.save_checkpoint({"step": 1, "w": torch.zeros(3)}, tmp_path, keep_last=2)

    def read_only(path, mode="r", *a, **k):
        if "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(ckpt, "open", read_only, raising=False)
    with pytest.raises(MscnError) as e:
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path, keep_last=2)
    assert str(e.value) == (f"cannot write {tmp_path / 'ckpt_00000002.pt'}: Read-only file system; the checkpoints "
                            f"written before are untouched: make {tmp_path} writable and resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.normal()  # populate numpy's cached gaussian
    path = ckpt.atomic_save({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.set_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_a_second_ctrl_c_inside_torch_save_is_an_interrupt_and_keeps_the_old_file(tmp_path, monkeypatch):
    """Ctrl-C inside torch.save makes its zip writer fail to close ("unexpected pos", a
    RuntimeError whose context is the KeyboardInterrupt): that is an interrupt (exit 130),
    not a crash, and the previous checkpoint and no temporary file are left."""
    target = tmp_path / "final.pt"
    ckpt.atomic_save({"step": 1}, target)

    def interrupted_save(obj, f):
        f.write(b"PK\x03\x04 half")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["final.pt"]


def test_an_unreadable_newer_checkpoint_cannot_rotate_the_run_away(tmp_path, capsys):
    """A resume skips a damaged ckpt_9 and continues from ckpt_3. The rotation used to count
    ckpt_9 as the newest, so with keep_last=1 it deleted ckpt_6 the moment it was written,
    and ckpt_3 with it: the folder kept only the damaged file, and the next resume
    started from scratch."""
    state = {"model": {"w": torch.arange(100.0)}, "optimizer": {}, "config": {}, "arch": "resnet18",
             "method": "simclr", "backbone": {}}
    ckpt.save_checkpoint({**state, "step": 3}, tmp_path, keep_last=1)
    good = ckpt.ckpt_path(tmp_path, 3).read_bytes()
    ckpt.ckpt_path(tmp_path, 9).write_bytes(good[: len(good) // 2])
    path, _ = ckpt.find_latest_valid(tmp_path, set_aside=True)
    assert path.name == "ckpt_00000003.pt"
    assert "set aside as ckpt_00000009.pt.unreadable" in capsys.readouterr().out
    assert (tmp_path / "ckpt_00000009.pt.unreadable").read_bytes() == good[: len(good) // 2]  # kept, renamed
    ckpt.save_checkpoint({**state, "step": 6}, tmp_path, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000006.pt"]
    assert ckpt.find_latest_valid(tmp_path)[1]["step"] == 6

    # the rotation alone, whatever is in the folder: a file named for a later step is
    # neither counted nor deleted, and the checkpoint just written always stays
    ckpt.ckpt_path(tmp_path, 20).write_bytes(b"junk")
    for step in (7, 8):
        ckpt.save_checkpoint({**state, "step": step}, tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000007.pt", "ckpt_00000008.pt",
                                                                 "ckpt_00000020.pt"]
    # evaluation reads a run folder without changing it
    assert ckpt.find_latest_valid(tmp_path)[0].name == "ckpt_00000008.pt"
    assert (tmp_path / "ckpt_00000020.pt").is_file()
