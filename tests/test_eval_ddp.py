"""The protocols under torchrun: 2 CPU ranks (gloo), each reading its own DALI shard.

Features gathered from 2 ranks must equal one process's (same samples, once each, in
index order); the linear probe, kNN and fine-tuning must run to the end with the
validation set counted exactly once. This is the real launcher (torch.distributed.run),
not a simulation of it.
"""
import json
import subprocess
import sys

import pytest
import torch

from eval_testdata import make_checkpoint, make_image_folder
from mscn.data.subset import make_subset
from mscn.train.eval.common import eval_loader, extract_features
from mscn.train.eval.linear import linear_probe
from mscn.train.eval.pretrained import load_pretrained
from mscn.train.runtime import setup_runtime

SCRIPT = r'''
import json, sys, torch
from mscn.train.distributed import cleanup
from mscn.train.eval.common import eval_loader, extract_features
from mscn.train.eval.pretrained import load_pretrained
from mscn.train.runtime import setup_runtime
from mscn.train.eval.finetune import finetune
from mscn.train.eval.knn import knn_eval
from mscn.train.eval.linear import linear_probe

ckpt, train, val, subset, out = sys.argv[1:6]
rt = setup_runtime("cpu")
backbone, _, cfg = load_pretrained(ckpt)
feats, labels = extract_features(backbone, eval_loader(cfg, train, rt, 16), rt)
res = {"world": rt.dist.world_size,
       "knn": knn_eval(backbone, eval_loader(cfg, train, rt, 16), eval_loader(cfg, val, rt, 16), rt),
       "linear": linear_probe(backbone, cfg, train, val, rt, epochs=1, batch=16),
       "linear_pre": linear_probe(backbone, cfg, train, val, rt, epochs=2, batch=16, precompute=True),
       "finetune": finetune(backbone, cfg, train, val, subset, rt, epochs=1, batch=16)}
if rt.is_main:
    torch.save({"feats": feats, "labels": labels}, out + "/feats.pt")
    open(out + "/res.json", "w").write(json.dumps(res))
cleanup()
'''


def test_two_ranks_match_one_process(tmp_path):
    make_image_folder(tmp_path / "train", per_class=12)
    make_image_folder(tmp_path / "val", per_class=6, seed=1)
    make_subset(tmp_path / "train", 0.5, seed=0, out=tmp_path / "half.txt")
    ckpt = str(make_checkpoint(tmp_path / "ck.pt"))
    (tmp_path / "run.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "run.py"),
           ckpt, str(tmp_path / "train"), str(tmp_path / "val"), str(tmp_path / "half.txt"), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["world"] == 2
    for k in ("linear", "linear_pre", "finetune"):
        assert res[k]["n_val"] == 18 and res[k]["settings"]["world_size"] == 2, k
    assert res["knn"]["n_train"] == 36 and res["knn"]["n_val"] == 18

    two = torch.load(tmp_path / "feats.pt")
    backbone, _, cfg = load_pretrained(ckpt)
    rt = setup_runtime("cpu")
    feats, labels = extract_features(backbone, eval_loader(cfg, str(tmp_path / "train"), rt, 16), rt)
    assert torch.equal(two["labels"], labels) and labels.tolist() == sorted(labels.tolist())
    torch.testing.assert_close(two["feats"], feats, rtol=1e-4, atol=1e-5)
    # the probe on cached features trains on the same global batches: its head's BatchNorm must
    # see them whole (it normalized each rank's half, and the losses depended on the world size)
    one = linear_probe(backbone, cfg, str(tmp_path / "train"), str(tmp_path / "val"), rt, epochs=2, batch=16,
                       precompute=True)
    assert res["linear_pre"]["loss"] == pytest.approx(one["loss"], rel=1e-4), (res["linear_pre"]["loss"], one["loss"])
    assert res["linear_pre"]["top1"] == one["top1"]


SCRIPT_APART = r'''
import os, sys
from mscn.config import load_config
from mscn.errors import MscnError
from mscn.train.distributed import cleanup
from mscn.train.eval.common import eval_loader
from mscn.train.runtime import setup_runtime

base, out = sys.argv[1:3]
rt = setup_runtime("cpu")
cfg = load_config(None, ["data.image_size=32", "data.val_resize=36", "data.num_threads=1"])
try:
    eval_loader(cfg, f"{base}/val{rt.dist.rank}", rt, 4)  # each rank its own copy
    said = "no error"
except MscnError as e:
    said = str(e)
open(f"{out}/said{rt.dist.rank}.txt", "w").write(said)
cleanup()
'''


def test_ranks_that_read_other_copies_of_the_eval_data_are_stopped(tmp_path):
    """Node 1's copy of the val set holds an image more: every rank would score a slice of
    another set. Each rank says so in one line before a feature is extracted."""
    make_image_folder(tmp_path / "val0", per_class=3)
    make_image_folder(tmp_path / "val1", per_class=3)
    (tmp_path / "val1" / "c0" / "extra.jpg").write_bytes((tmp_path / "val1" / "c0" / "000.jpg").read_bytes())
    (tmp_path / "run.py").write_text(SCRIPT_APART)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "run.py"),
           str(tmp_path), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        said = (tmp_path / f"said{rank}.txt").read_text()
        assert said.startswith("the ranks do not read the same dataset (rank 0: 9 samples in "), said
        assert "rank 1: 10 samples in" in said
