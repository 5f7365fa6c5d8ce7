"""DALI's executor settings (``data.op_concurrency``, ``data.stream_policy``): they reach
every pipeline the loaders build, they change how DALI schedules the graph and never what
it computes, and a run may change them between a checkpoint and its resume.

On the CPU path DALI runs CPU operators one at a time whatever the setting, so the
equality tests here guard the wiring and the checkpoint; the GPU test at the end is the
one where the schedule really changes."""
import pytest
import torch
from nvidia.dali.pipeline import OperatorConcurrency, StreamPolicy
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.errors import ConfigError
from mscn.pipelines import build_eval_loader, build_train_loader
from mscn.pipelines.loader import plan
from mscn.pipelines.tuning import executor

FULL = ["data.op_concurrency=full", "data.stream_policy=per_operator"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("executor"), classes=2, per_class=12)  # 24 images


def pipe_of(loader):
    (pipe,) = loader._iter._pipes
    return pipe


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
    assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))


def test_settings_map_to_dalis_enums_and_auto_leaves_dalis_default():
    assert executor("auto", "auto") == {}  # DALI's default on both paths until a GPU run decides
    assert executor("full", "per_operator") == {"concurrency": OperatorConcurrency.FULL,
                                                "stream_policy": StreamPolicy.PER_OPERATOR}
    assert executor("none", "single") == {"concurrency": OperatorConcurrency.NONE, "stream_policy": StreamPolicy.SINGLE}
    assert executor("backend", "auto") == {"concurrency": OperatorConcurrency.BACKEND}
    assert executor("auto", "auto", thread_affinity=True) == {"set_affinity": True}


def test_typos_are_refused_with_the_key_and_the_choices(folder):
    with pytest.raises(ConfigError, match=r"data.op_concurrency = 'ful': must be auto, none, backend, full"):
        tiny_cfg(folder, "data.op_concurrency=ful")
    with pytest.raises(ConfigError, match=r"data.stream_policy = 'per_op': must be auto, single, per_backend"):
        tiny_cfg(folder, "data.stream_policy=per_op")


def test_the_loaders_build_their_pipelines_with_the_settings(folder):
    cfg = tiny_cfg(folder, "train.global_batch=8", *FULL)
    assert plan(cfg, None).executor == {"concurrency": OperatorConcurrency.FULL,
                                        "stream_policy": StreamPolicy.PER_OPERATOR}
    for loader in (build_train_loader(cfg), build_eval_loader(cfg, str(folder), batch_size=8),
                   build_eval_loader(cfg, str(folder), batch_size=8, train_views=True)):
        pipe = pipe_of(loader)
        assert pipe.concurrency == OperatorConcurrency.FULL and pipe.stream_policy == StreamPolicy.PER_OPERATOR
    default = pipe_of(build_train_loader(tiny_cfg(folder, "train.global_batch=8")))
    assert default.concurrency is None and default.stream_policy is None  # DALI's own default
    assert not default.set_affinity
    pinned = tiny_cfg(folder, "train.global_batch=8", "data.thread_affinity=true")
    for loader in (build_train_loader(pinned), build_eval_loader(pinned, str(folder), batch_size=8)):
        assert pipe_of(loader).set_affinity


@pytest.mark.parametrize("extra", [[], ["data.blur_where=loader"]])
def test_full_concurrency_gives_the_same_batches(folder, extra):
    """Four views of independent branches, conditionals, masks: bit for bit the same."""
    cfg = tiny_cfg(folder, "train.global_batch=8", "train.seed=5", *extra)
    full_cfg = tiny_cfg(folder, "train.global_batch=8", "train.seed=5", *extra, *FULL)
    ours, full = batches(build_train_loader(cfg), 3), batches(build_train_loader(full_cfg), 3)
    for a, b in zip(ours, full):
        assert_same(a, b)
    evals = [next(iter(build_eval_loader(c, str(folder), batch_size=8))) for c in (cfg, full_cfg)]
    assert_same(*evals)


def test_a_checkpoint_resumes_exactly_under_other_settings(folder):
    """The settings are neutral for a resume (train/rundir.py): DALI's checkpoint taken
    with its default executor continues exactly under full concurrency."""
    cfg = tiny_cfg(folder, "train.global_batch=8", "train.seed=2")
    first = build_train_loader(cfg)
    it = iter(first)
    next(it)
    state = first.state_dict()
    expected = [next(it) for _ in range(2)]
    resumed = build_train_loader(tiny_cfg(folder, "train.global_batch=8", "train.seed=2", *FULL), state=state)
    for a, b in zip(expected, batches(resumed, 2)):
        assert_same(a, b)


def test_a_run_may_change_the_settings_between_invocations(folder):
    from mscn.config import to_dict
    from mscn.train.rundir import differing_keys

    saved = to_dict(tiny_cfg(folder))
    assert differing_keys(saved, tiny_cfg(folder, *FULL)) == []
    assert differing_keys(saved, tiny_cfg(folder, "data.thread_affinity=true", "data.handover=private")) == []
    assert differing_keys(saved, tiny_cfg(folder, "data.crop=window")) == ["data.crop"]  # a graph change is not


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_pipeline_gives_the_same_batches_on_its_own_streams(folder):
    """Where the setting matters: GPU operators of the four views at once, each branch on a
    stream of its own. The outputs must not depend on that schedule."""
    dev = torch.device("cuda")
    cfg = tiny_cfg(folder, "train.global_batch=8", "train.seed=5")
    ours = batches(build_train_loader(cfg, device=dev), 3)
    full = batches(build_train_loader(tiny_cfg(folder, "train.global_batch=8", "train.seed=5", *FULL), device=dev), 3)
    for a, b in zip(ours, full):
        assert_same(a, b)
