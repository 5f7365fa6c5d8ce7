"""The GPU handover of DALI's outputs (``data.handover``) and the event that keeps them until
the adapter's reads are done (``DaliLoader._retire``); skipped without CUDA."""
import pytest
import torch
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.pipelines import build_eval_loader, build_train_loader

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("handover"), classes=2, per_class=12)  # 24 images


def _spin(ms: float) -> None:
    """About ``ms`` of spin kernel on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**6)
    end.record()
    end.synchronize()
    torch.cuda._sleep(int(10**6 / start.elapsed_time(end) * ms))


@pytest.mark.parametrize("blur_where", ["loader", "pipeline"])
def test_gpu_private_handover_gives_the_same_batches(folder, blur_where):
    """A private stream changes where DALI's outputs are imported, not what they are; with the
    blur in DALI the masks write into the views DALI made, which the adapter copies first."""
    cfg = tiny_cfg(folder, "train.global_batch=8", f"data.blur_where={blur_where}")
    a = build_train_loader(cfg, device=CUDA)
    b = build_train_loader(tiny_cfg(folder, "train.global_batch=8", f"data.blur_where={blur_where}",
                                    "data.handover=private"), device=CUDA)
    for n, (x, y) in enumerate(zip(a, b), 1):
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views)) and torch.equal(x.labels, y.labels)
    assert n == 3 and b._private is not None and a._private is None


def test_gpu_views_are_never_dali_memory(folder):
    """The evaluation views come out of DALI finished (the high-pass is DALI's on the GPU): the
    adapter copies them, so no read of DALI's buffers is left to the trainer's step."""
    loader = build_eval_loader(tiny_cfg(folder), str(folder), device=CUDA, batch_size=8)
    loader.hold(1)  # else the outputs may go back before they are looked at: the GPU is idle
    for batch in loader:
        dali = {t.untyped_storage().data_ptr() for t in loader._held[-1][0][0].values() if t.is_cuda}
        assert dali and batch.views[0].untyped_storage().data_ptr() not in dali
        break


def test_gpu_outputs_are_kept_until_the_reads_queued_before_them_are_done(folder):
    loader = build_train_loader(tiny_cfg(folder, "train.global_batch=8"), device=CUDA)
    it = iter(loader)
    next(it)
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):  # a stream of the test's: no other work joins it
        _spin(300)  # the adapter's reads of the next two batches queue behind this
        next(it)
        next(it)
        assert len(loader._held) == 2 and not loader._held[0][1].query()  # both still waiting for their reads
    torch.cuda.synchronize()
    loader._retire(None, None)
    assert len(loader._held) == 0
