"""DDP on 2 gloo ranks x B samples == one process on 2B samples (paper App. A.1 recipe).

Both ranks run the real trainer pieces (:func:`build_model` with SyncBN + DDP,
:func:`train_step`, the gathered InfoNCE, LARS/SGD); the single process runs the same
step on the concatenated batch. Loss, every parameter update, the BN running stats and
BYOL's EMA target must agree to fp32 precision. Without SyncBN they must *not* (the
control that shows the comparison can fail).
"""
import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from mscn.config import load_config
from mscn.data.filecheck import check_training_files
from mscn.data.source import Source
from mscn.errors import DataError, MscnError
from mscn.train.distributed import (DistInfo, check_same_data, cleanup, gather_objects, gather_with_grad,
                                    init_distributed)
from mscn.train.lars import build_optimizer
from mscn.train.losses import info_nce
from mscn.train.pretrain import build_model, train_step

B, VIEWS, LR = 4, 3, 0.05
WORLD = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(method, optim, sync_bn=True):
    return load_config(None, ["model.arch=resnet18", "model.proj_hidden=64", "model.proj_out=32",
                              "model.pred_hidden=64", f"method.name={method}", f"optim.name={optim}",
                              f"model.sync_bn={str(sync_bn).lower()}"])


def make_views():
    g = torch.Generator().manual_seed(123)
    return [torch.randn(WORLD * B, 3, 32, 32, generator=g) for _ in range(VIEWS)]


def one_step(cfg, info, views):
    torch.manual_seed(0)  # same initial weights everywhere (DDP would broadcast rank 0's anyway)
    net, model = build_model(cfg, torch.device("cpu"), info)
    opt, _ = build_optimizer(cfg.optim, net, lr=LR)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_step(model, opt, scaler, views, None)
    net.after_optimizer_step(0, 10)
    return loss, {k: v.detach().clone() for k, v in net.state_dict().items()}


CASES = [("simclr", "sgd"), ("byol", "lars")]


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    info = init_distributed("cpu", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = [v[rank * B:(rank + 1) * B] for v in make_views()]
        result = {}
        for method, optim in CASES:
            for sync_bn in (True, False) if method == "simclr" else (True,):
                loss, state = one_step(make_cfg(method, optim, sync_bn), info, local)
                dist.all_reduce(loss)  # each rank's loss is the mean over its anchors
                result[f"{method}-{optim}-{sync_bn}"] = (loss / WORLD, state)
        # the gathered InfoNCE on its own: value and gradient w.r.t. the local embeddings
        g = torch.Generator().manual_seed(7)
        emb = [torch.randn(WORLD * B, 16, generator=g) for _ in range(VIEWS)]
        mine = [e[rank * B:(rank + 1) * B].clone().requires_grad_(True) for e in emb]
        nce = info_nce(mine, 0.2)
        nce.backward()
        nce = nce.detach()
        dist.all_reduce(nce)
        result["nce"] = (nce / WORLD, [m.grad / WORLD for m in mine])  # DDP's 1/world averaging
        result["gather"] = gather_with_grad(torch.full((2,), float(rank)))
        # every rank must read the same dataset: the same files at another mount point agree,
        # a copy with one image more on rank 1 does not (one line on every rank)
        check_same_data(Source("folder", f"/node{rank}/data", 2, files=("a.jpg", "b.jpg"), labels=(0, 1)), info)
        files = ("a.jpg", "b.jpg", "c.jpg")[:2 + rank]
        try:
            check_same_data(Source("folder", "data", len(files), files=files, labels=(0,) * len(files)), info)
            result["other_data"] = ""
        except MscnError as e:
            result["other_data"] = str(e)
        # the ranks split the check of the training files (rank r: r, r + 2, ...) and all name
        # the first damaged file of the whole list: 3.jpg is rank 1's, 4.jpg rank 0's
        names = tuple(f"{i}.jpg" for i in range(6))
        try:
            check_training_files(Source("folder", f"{out_dir}/files", 6, files=names, labels=(0,) * 6), rank, WORLD,
                                 gather=gather_objects)
            result["damaged"] = ""
        except DataError as e:
            result["damaged"] = str(e)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One 2-process gloo run computing every case (spawning costs more than the steps)."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "files").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 140, 200)).save(buf, "JPEG")
    good = buf.getvalue()
    for i in range(6):
        (out / "files" / f"{i}.jpg").write_bytes(good)
    (out / "files" / "3.jpg").write_bytes(good[:200])
    (out / "files" / "4.jpg").write_bytes(b"")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("method,optim", CASES)
def test_ddp_two_ranks_equal_one_process_on_the_whole_batch(ranks, method, optim):
    single_loss, single = one_step(make_cfg(method, optim), DistInfo(), make_views())
    torch.manual_seed(0)
    start = build_model(make_cfg(method, optim), torch.device("cpu"), DistInfo())[0].state_dict()

    ddp_loss, ddp = ranks[0][f"{method}-{optim}-True"]
    torch.testing.assert_close(ddp_loss, single_loss, rtol=1e-5, atol=1e-6)
    moved = 0
    for k, v in single.items():
        assert torch.equal(ddp[k], ranks[1][f"{method}-{optim}-True"][1][k]), f"ranks disagree on {k}"
        if not v.is_floating_point():
            assert torch.equal(ddp[k], v), k
            continue
        delta_single, delta_ddp = v - start[k], ddp[k] - start[k]
        scale = delta_single.norm().item()
        assert (delta_ddp - delta_single).norm().item() <= 1e-3 * scale + 1e-7, k
        moved += scale > 0
    assert moved > 100  # the step really changed (almost) every tensor

    if method == "simclr":  # control: per-rank BN statistics give another loss and update
        nosync_loss, nosync = ranks[0][f"{method}-{optim}-False"]
        assert abs(nosync_loss.item() - single_loss.item()) > 1e-4
        key = "backbone.conv1.weight"
        assert (nosync[key] - single[key]).norm() > 1e-2 * (single[key] - start[key]).norm()


def test_gathered_info_nce_matches_single_process(ranks):
    g = torch.Generator().manual_seed(7)
    emb = [torch.randn(WORLD * B, 16, generator=g).requires_grad_(True) for _ in range(VIEWS)]
    loss = info_nce(emb, 0.2)
    loss.backward()
    torch.testing.assert_close(ranks[0]["nce"][0], loss.detach(), rtol=1e-5, atol=1e-6)
    for r in range(WORLD):
        for v in range(VIEWS):
            torch.testing.assert_close(ranks[r]["nce"][1][v], emb[v].grad[r * B:(r + 1) * B], rtol=1e-4, atol=1e-7)
    assert torch.equal(ranks[1]["gather"], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_ranks_reading_other_datasets_stop_at_the_start(ranks):
    for r in range(WORLD):
        assert ranks[r]["other_data"].startswith(
            "the ranks do not read the same dataset (rank 0: 2 samples in data; rank 1: 3 samples in data)")


def test_every_rank_names_the_first_damaged_training_file_of_the_whole_list(ranks):
    """Each rank reads only its share of the files; all_gather_object hands every rank the
    others' findings, so rank 0 names rank 1's 3.jpg (its own first is 4.jpg) and the ranks
    stop with one and the same line."""
    said = [ranks[r]["damaged"] for r in range(WORLD)]
    assert said[0] == said[1], said
    path, why = said[0].split(": ", 1)
    assert path.endswith("/files/3.jpg") and why.startswith("a JPEG cut short"), said
