"""Reusing the pipeline from another project's code: wrong arguments give one line naming
them, before DALI runs (where they surfaced as operator assertions, a dataset error advising
`mscn data scan`, or a segfault for a negative shard id). Real DALI CPU pipelines."""
import dataclasses
from pathlib import Path

import pytest
import torch
from nvidia.dali import fn, pipeline_def
from nvidia.dali.plugin.pytorch import LastBatchPolicy

from mscn.config import ConfigError, MaskCfg, ViewCfg, checked
from mscn.cuda_kernels import apply_masks
from mscn.errors import DataError, MscnError
from mscn.pipelines import DaliLoader, build_eval_loader, build_train_loader, resolve_source, views_pipeline
from mscn.pipelines.diagnose import explain
from mscn.pipelines.eval_pipeline import eval_pipeline
from pipeline_fixtures import make_folder, tiny_cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("args") / "ds", classes=2, per_class=4)


@pytest.mark.parametrize("kw, msg", [
    (dict(rank=-1), r"rank -1 of world_size 1 .*0 <= rank < world_size"),
    (dict(rank=2, world_size=2), r"rank 2 of world_size 2"),
    (dict(world_size=0), r"rank 0 of world_size 0 .*world_size >= 1"),
    (dict(rank="1", world_size=2), r"rank: expected an integer, got '1' \(int\(os.environ\['RANK'\]\)\)"),
    (dict(device="tpu"), r"device: 'tpu' is not a torch device"),
    (dict(device="gpu"), r"device: 'gpu' is DALI's name; .* 'cuda' \(or 'cuda:N'\) for the GPU pipeline"),
    (dict(device="mixed"), r"device: 'mixed' is DALI's name"),
])
def test_a_rank_world_size_or_device_it_cannot_be_is_one_line(folder, kw, msg):
    cfg = tiny_cfg(folder, "train.global_batch=4")
    for build in (lambda: build_train_loader(cfg, **kw), lambda: build_eval_loader(cfg, str(folder), **kw)):
        with pytest.raises(ValueError, match=msg):
            build()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_a_cuda_device_without_cuda_is_named(folder):
    with pytest.raises(ValueError, match=r"device cuda:0: CUDA is not available on this machine; pass device=None"):
        build_train_loader(tiny_cfg(folder, "train.global_batch=4"), device=torch.device("cuda", 0))


def test_a_config_built_in_code_gets_the_schemas_types(folder):
    cfg = tiny_cfg(folder, "train.global_batch=4")
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size="32"))
    with pytest.raises(ConfigError, match=r"<config>: data.image_size: expected an integer, got '32'"):
        build_train_loader(bad)
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=(0.5, 0.5)))
    with pytest.raises(ConfigError, match=r"data.mean: expected a list of 3 values"):
        build_train_loader(bad)
    bad = dataclasses.replace(cfg, views=[dataclasses.replace(cfg.views[0], scale=0.5), *cfg.views[1:]])
    with pytest.raises(ConfigError, match=r"views\[0\].scale: expected a list of 2 values, got 0.5"):
        build_train_loader(bad)
    with pytest.raises(ConfigError, match=r"config: expected a mscn.config.Config \(or a dict of its keys\), got list"):
        checked([cfg])
    # what is meant is taken: a Path root, views as dicts, the whole config as a dict
    as_dict = dataclasses.asdict(cfg)
    as_dict["data"]["root"] = Path(folder)
    as_dict["views"] = [dict(v, flip_prob=0.0) for v in as_dict["views"]]
    again = checked(as_dict)
    assert again.data.root == str(folder) and all(v.flip_prob == 0.0 for v in again.views)
    assert len(build_train_loader(as_dict)) == 2


def test_a_loader_takes_one_view_and_a_batch_of_one_the_trainer_refuses(folder):
    """A loader for another project's trainer: one view, or one image per batch to debug, is a
    pipeline like any other; only mscn's siamese trainer needs 2 views and InfoNCE's negatives."""
    from mscn.config_checks import validate

    cfg = tiny_cfg(folder, "train.global_batch=4")
    one = dataclasses.replace(cfg, views=cfg.views[:1], train=dataclasses.replace(cfg.train, global_batch=1))
    batch = next(iter(build_train_loader(one)))
    assert len(batch.views) == 1 and batch.views[0].shape[0] == 1
    with pytest.raises(ConfigError, match=r"views = 1: a siamese network needs at least 2 views"):
        validate(one)
    with pytest.raises(ConfigError, match=r"views = 0: needs at least 1 view"):
        build_train_loader(dataclasses.replace(cfg, views=[]))
    with pytest.raises(ConfigError, match=r"train.global_batch = 0: must be >= 1"):
        build_train_loader(dataclasses.replace(one, train=dataclasses.replace(cfg.train, global_batch=0)))


def test_eval_batch_size_zero_is_refused_not_replaced(folder):
    with pytest.raises(ValueError, match=r"batch_size: expected an integer >= 1 \(images per rank\) or None, got 0"):
        build_eval_loader(tiny_cfg(folder), str(folder), batch_size=0)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(device="cuda"), ValueError, r"device: expected one of cpu, gpu, got 'cuda' \('gpu' for a CUDA pipeline\)"),
    (dict(highpass=(5.0, 30)), ValueError, r"highpass: expected \(sigma > 0, odd window >= 3\) or None, got \(5.0, 30\)"),
    (dict(mean=(0.5, 0.5)), ValueError, r"mean: expected 3 numbers"),
    # torchvision's 0-1 values: views ~255x too large, without an error anywhere
    (dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), ValueError,
     r"std \(0.229, 0.224, 0.225\) is on the 0-1 scale .*multiply both by 255"),
    (dict(view_dtype="float64"), ValueError, r"view_dtype: expected one of float32, float16"),
    (dict(shard_id=-1), ValueError, r"shard_id -1 of num_shards 1"),
    (dict(views=[ViewCfg(scale=(1.0, 0.08)), ViewCfg()]), ConfigError, r"views\[0\].scale = \(1.0, 0.08\): must be an increasing"),
    (dict(views=[ViewCfg(flip_prob=2.0), ViewCfg()]), ConfigError, r"views\[0\].flip_prob = 2.0: must be a probability"),
    (dict(views=[MaskCfg(), ViewCfg()]), TypeError, r"views\[0\]: a MaskCfg; a view is ViewCfg\(..., mask=MaskCfg"),
    # DALI's reader segfaulted at the first batch on an initial_fill of 0 or -1
    (dict(shuffle_buffer=0), ValueError, r"shuffle_buffer: expected an integer >= 1 \(the reader's initial_fill\), got 0"),
    (dict(shuffle_buffer=-1), ValueError, r"shuffle_buffer: expected an integer >= 1"),
    (dict(crop="foo"), ValueError, r"crop: expected 'rrc', 'window' or None \(data.crop\), got 'foo'"),
])
def test_views_pipeline_arguments_are_checked_before_dali(folder, kw, err, msg):
    args = dict(source=resolve_source(str(folder)), views=[ViewCfg(), ViewCfg()], image_size=32, highpass=None)
    args.update(kw)
    with pytest.raises(err, match=msg) as e:
        views_pipeline(**args, batch_size=2, num_threads=1, device_id=None)
    assert "\n" not in str(e.value)  # not DALI's autograph paragraph around it


def test_an_unshuffled_pipeline_takes_any_shuffle_buffer(folder):
    """DALI reads in order with no buffer: only a shuffling reader needs one (a review)."""
    source = resolve_source(str(folder))
    pipe = views_pipeline(source, [ViewCfg()], image_size=32, highpass=None, shuffle=False, shuffle_buffer=0,
                          batch_size=2, num_threads=1, device_id=None, seed=1)
    assert next(iter(DaliLoader(pipe, source, 1, policy="drop"))).index.tolist() == [0, 1]


def test_a_pipeline_without_its_batch_size_or_threads_is_refused_when_built(folder):
    """DALI builds one all the same and fails when the loader runs it, with a TypeError of its
    internals ("'<' not supported between instances of 'NoneType' and 'int')."""
    source = resolve_source(str(folder))
    for missing, given in (("num_threads", {"batch_size": 4}), ("batch_size", {"num_threads": 1})):
        with pytest.raises(ValueError, match=f"{missing}: a pipeline argument, expected an integer >= 1, got None"):
            views_pipeline(source, [ViewCfg(), ViewCfg()], highpass=None, device_id=None, **given)
    with pytest.raises(ValueError, match="batch_size: a pipeline argument, expected an integer >= 1, got 0"):
        eval_pipeline(source, batch_size=0, num_threads=1, device_id=None)


def test_numpy_numbers_and_arrays_are_taken_and_masks_are_not_the_pipelines(folder):
    """Values from numpy (a computed batch, a mean array) are numbers like any other; a view's
    mask grid is for the loader's masks, so a pipeline at 16 px takes the default 32 px grid."""
    import numpy as np

    source = resolve_source(str(folder))
    pipe = views_pipeline(source, [ViewCfg(), ViewCfg(flip_prob=np.float32(0.5))], image_size=np.int64(16),
                          mean=np.array([120.0, 115.0, 100.0]), std=[np.float32(58.0)] * 3,
                          highpass=(np.float64(1.0), np.int64(5)), shard_id=np.int64(0), num_shards=np.int64(1),
                          batch_size=2, num_threads=1, device_id=None, seed=1)
    loader = DaliLoader(pipe, source, 2, policy=LastBatchPolicy.DROP)
    assert next(iter(loader)).views[0].shape == (2, 3, 16, 16)
    cfg = tiny_cfg(folder, "train.global_batch=4")
    cfg.train.global_batch = np.int64(4)
    cfg.views[0].mask.ratio = np.float32(0.25)
    assert len(build_train_loader(cfg, rank=np.int64(0), world_size=np.int64(1))) == 2
    assert len(build_eval_loader(tiny_cfg(folder), str(folder), batch_size=np.int64(4))) == 2


def test_a_path_instead_of_a_source_is_named(folder):
    with pytest.raises(TypeError, match=r"source: expected a mscn Source, got str \(mscn.pipelines.resolve_source"):
        views_pipeline(str(folder), [ViewCfg(), ViewCfg()], image_size=32, batch_size=2, num_threads=1,
                       device_id=None)
    with pytest.raises(TypeError, match=r"resolve_source: expected a path \(str or os.PathLike\), got list"):
        resolve_source([str(p) for p in Path(folder).rglob("*.jpg")])
    # an empty root names the setting it came from (it said data.root, which was set)
    cfg = tiny_cfg(folder)
    with pytest.raises(DataError, match=r"no dataset given: set data.val_root \("):
        build_eval_loader(cfg, "")
    with pytest.raises(DataError, match=r"no dataset given: set data.root \("):
        build_train_loader(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root="")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_a_hand_built_loader_for_a_cuda_device_without_cuda_says_so_when_built(folder):
    """Before, it was built and failed at the first batch with torch's "Found no NVIDIA driver"."""
    source = resolve_source(str(folder))
    pipe = views_pipeline(source, [ViewCfg()], image_size=16, highpass=None, batch_size=2, num_threads=1,
                          device_id=None, seed=1)
    with pytest.raises(ValueError, match=r"device cuda: CUDA is not available on this machine"):
        DaliLoader(pipe, source, 1, policy="drop", device=torch.device("cuda"))


def test_dali_loader_refuses_what_it_cannot_deliver(folder):
    source = resolve_source(str(folder))
    views = [ViewCfg(), ViewCfg()]

    def pipe(batch):
        return views_pipeline(source, views, image_size=32, highpass=None, batch_size=batch, num_threads=1,
                              device_id=None, seed=1)

    with pytest.raises(ValueError, match=r"the pipeline has 3 outputs, but this loader expects 4: view0, view1, "
                                         r"view2, index \(num_views=3, .*\); it looks built with 2 view\(s\), so "
                                         r"pass num_views=2"):
        DaliLoader(pipe(2), source, 3, policy=LastBatchPolicy.DROP)
    with pytest.raises(ValueError, match=r"policy: expected a nvidia.dali.plugin.pytorch.LastBatchPolicy or one "
                                         r"of fill, drop, partial, got 'last'"):
        DaliLoader(pipe(2), source, 2, policy="last")
    assert len(DaliLoader(pipe(2), source, 2, policy="drop")) == 4  # the name is taken
    # a debug pipeline's 1 view + flags + area with the num_views its outputs suggest: its
    # flags and areas were handed out as views
    debug = views_pipeline(source, [ViewCfg()], image_size=32, highpass=None, batch_size=2, num_threads=1,
                           device_id=None, seed=1, debug_outputs=True)
    with pytest.raises(ValueError, match=r"output 1 of the pipeline, taken as view1, is no batch of images \(shape "
                                         r"\(2, 5\)\): pass the num_views .*debug_outputs=True is for tests"):
        next(iter(DaliLoader(debug, source, 3, policy="drop")))
    with pytest.raises(TypeError, match=r"source: expected a mscn Source, got str"):  # an AttributeError inside
        DaliLoader(pipe(2), str(source.root), 2, policy="drop")
    with pytest.raises(ValueError, match=r"output dtype 'float64': expected one of float32, float16, bfloat16"):
        DaliLoader(pipe(2), source, 2, policy=LastBatchPolicy.DROP, output_dtype="float64")
    # the high-pass it applies (CPU path): sigma 0 gave NaN views, a window of 1 zeros, an
    # even one a ValueError of the filter at the first batch
    for bad in ((0.0, 31), (5.0, 1), (5.0, 30), (-1.0, 31), (float("nan"), 31)):
        with pytest.raises(ValueError, match=r"highpass: expected \(sigma > 0, odd window >= 3\) or None"):
            DaliLoader(pipe(2), source, 2, policy=LastBatchPolicy.DROP, highpass=bad)
    # 8 images, batches of 64: dropping the partial batch leaves none (the loop would end at once)
    with pytest.raises(DataError, match=r"fewer images than one batch of 64"):
        DaliLoader(pipe(64), source, 2, policy=LastBatchPolicy.DROP)
    assert len(DaliLoader(pipe(64), source, 2, policy=LastBatchPolicy.PARTIAL)) == 1


def test_a_dali_argument_error_is_not_blamed_on_the_data(folder):
    """An operator other than a reader or decoder failing is a setting, not a file: no
    advice to scan the data."""
    source = resolve_source(str(folder))

    @pipeline_def
    def bad():
        jpegs, _ = fn.readers.file(file_root=source.root, files=list(source.files), name="Reader")
        images = fn.decoders.image(jpegs)
        return fn.crop_mirror_normalize(images, mean=[1.0, 2.0], std=[1.0, 2.0, 3.0])

    pipe = bad(batch_size=2, num_threads=1, device_id=None)
    pipe.build()
    with pytest.raises(RuntimeError) as raw:
        pipe.run()
    err = explain(raw.value, source, None, 0)
    assert type(err) is MscnError and "mscn data scan" not in str(err)
    assert str(err).startswith("DALI's fn.crop_mirror_normalize refused the pipeline's arguments (")


def test_apply_masks_names_the_usual_mix_ups():
    views = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    cfgs = [MaskCfg(grid=4), MaskCfg(grid=4)]
    with pytest.raises(MscnError, match=r"got one tensor of shape \(2, 2, 3, 16, 16\) \(list\(t.unbind\(0\)\)"):
        apply_masks(torch.stack(views), cfgs)
    with pytest.raises(MscnError, match=r"cfgs\[0\]: expected a MaskCfg, got ViewCfg \(a ViewCfg: pass its .mask\)"):
        apply_masks(views, [ViewCfg(), ViewCfg()])
    with pytest.raises(MscnError, match=r"generator: expected a torch.Generator or None, got int"):
        apply_masks(views, cfgs, 7)
    # a wrong type in a MaskCfg built in code: the schema's line, not a TypeError from a comparison
    with pytest.raises(ConfigError, match=r"views\[1\]\.mask\.ratio: expected a number, got '0.2'"):
        apply_masks(views, [MaskCfg(grid=4), MaskCfg(grid=4, ratio="0.2")])
    with pytest.raises(MscnError, match=r"view 0: expected a floating \(B, C, H, W\) tensor, got ndarray"):
        apply_masks([v.numpy() for v in views], cfgs)
    leaf = [v.clone().requires_grad_() for v in views]
    with pytest.raises(MscnError, match=r"cannot be masked in place; pass inplace=False"):
        apply_masks(leaf, cfgs)
    out = apply_masks(leaf, cfgs, inplace=False)
    assert all(o.requires_grad for o in out)


def test_a_mask_generator_checks_its_configs_when_made():
    """``mask_fn_from_cfgs`` checked nothing until the loader's first batch, and took no dict
    (the config builders take one for the same fields)."""
    from mscn.pipelines.loader import mask_fn_from_cfgs

    with pytest.raises(ConfigError, match=r"views\[0\]\.mask\.ratio = 1.5"):
        mask_fn_from_cfgs([MaskCfg(ratio=1.5)], 0)
    with pytest.raises(MscnError, match=r"mask_cfgs\[1\]: expected a MaskCfg, got ViewCfg \(a ViewCfg: pass its .mask\)"):
        mask_fn_from_cfgs([MaskCfg(), ViewCfg()], 0)
    with pytest.raises(ConfigError, match=r"ratoi"):
        mask_fn_from_cfgs([{"ratoi": 0.1}], 0)
    with pytest.raises(MscnError, match=r"mask_cfgs: expected a list of MaskCfg, one per view, got MaskCfg"):
        mask_fn_from_cfgs(MaskCfg(), 0)
    from types import MappingProxyType

    gen = mask_fn_from_cfgs([{"ratio": 0.3, "grid": 4}], 0)
    assert gen.mask_cfgs == [MaskCfg(ratio=0.3, grid=4)]
    assert mask_fn_from_cfgs([MappingProxyType({"grid": 4})], 0).mask_cfgs == [MaskCfg(grid=4)]  # any mapping
    assert gen([torch.randn(2, 3, 16, 16)])[0].shape == (2, 3, 16, 16)


def test_a_corrupt_file_met_before_the_decoder_is_still_the_datas(tmp_path):
    """peek_image_shape reads the JPEG header (data.crop=window), ahead of a GPU decode: its
    failure is the file's, not a setting."""
    root = make_folder(tmp_path / "ds", classes=1, per_class=2)
    (root / "c0" / "000.jpg").write_bytes(b"\xff\xd8 not a jpeg at all" * 20)
    source = resolve_source(str(root))

    @pipeline_def
    def peek():
        jpegs, _ = fn.readers.file(file_root=source.root, files=list(source.files), name="Reader")
        return fn.peek_image_shape(jpegs)

    pipe = peek(batch_size=2, num_threads=1, device_id=None)
    pipe.build()
    with pytest.raises(RuntimeError) as raw:
        pipe.run()
    assert "peek_image_shape" in str(raw.value)
    assert type(explain(raw.value, source, None, 0)) is DataError


def test_a_loader_whose_grid_masks_far_from_its_ratio_warns(folder):
    """Another project's trainer builds the loader itself and never sees `mscn pretrain`'s
    notes: the paper's 32 px grid on 32 px views has 1 to 4 cells, so 15 % rounds to
    none or one of them."""
    import warnings

    from mscn.maskspec import MaskCoverageWarning

    coarse = tiny_cfg(folder, "train.global_batch=4", "views.1.mask.grid=32")
    with pytest.warns(MaskCoverageWarning, match=r"views\[1\].mask: a 32 px grid on 32 px views"):
        build_train_loader(coarse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskCoverageWarning)
        build_train_loader(tiny_cfg(folder, "train.global_batch=4"))  # grid 8: close to the ratio
        build_train_loader(coarse, apply_mask=False)  # no masks, nothing to say


def test_a_gpu_pipeline_without_a_device_id_is_named_when_built(folder):
    """device='gpu' with device_id=None (what DALI's own CUDA error advises) built a pipeline
    that failed at its first batch with a DataError telling the user to scan the data."""
    with pytest.raises(ValueError, match=r"device='gpu' needs device_id .*pass device='cpu' with it"):
        views_pipeline(resolve_source(str(folder)), [ViewCfg(), ViewCfg()], image_size=32, device="gpu",
                       batch_size=2, num_threads=1, device_id=None, seed=1)
    with pytest.raises(ValueError, match=r"device='gpu' needs device_id"):
        eval_pipeline(resolve_source(str(folder)), image_size=32, resize=36, device="gpu", batch_size=2,
                      num_threads=1)


def test_the_pipelines_seed_sets_the_readers_order(tmp_path):
    """views_pipeline(seed=..) without a reader_seed: DALI's reader took -1 as a fixed seed
    of its own, so every seed read the images in the same order (only the augmentations
    changed). The pipeline's seed now seeds the reader; an explicit reader_seed still wins."""
    folder = make_folder(tmp_path / "ds", classes=3, per_class=10)
    source = resolve_source(str(folder))

    def order(**kw):
        pipe = views_pipeline(source, [ViewCfg()], image_size=16, highpass=None, batch_size=5, num_threads=1,
                              device_id=None, shuffle_buffer=8, **kw)
        loader = DaliLoader(pipe, source, 1, policy="drop")
        return [[i for b in loader for i in b.index.tolist()] for _ in range(2)]

    one, two = order(seed=1), order(seed=2)
    assert one == order(seed=1) and one != two
    assert order(seed=1, reader_seed=7) == order(seed=2, reader_seed=7)


def test_a_rank_whose_last_batch_is_empty_gets_it_unmasked(tmp_path):
    """PARTIAL over 12 images on 5 ranks, batch 2: three ranks end on an empty batch, which
    the docs tell the user to skip; masking it raised "cannot mask an empty view" first."""
    from mscn.pipelines import mask_fn_from_cfgs

    folder = make_folder(tmp_path / "ds", classes=2, per_class=6)
    source = resolve_source(str(folder))
    sizes = []
    for rank in range(5):
        pipe = eval_pipeline(source, image_size=16, resize=20, highpass=None, shard_id=rank, num_shards=5,
                             batch_size=2, num_threads=1, device_id=None, seed=1)
        loader = DaliLoader(pipe, source, 1, policy=LastBatchPolicy.PARTIAL,
                            mask_fn=mask_fn_from_cfgs([MaskCfg()], 0))
        sizes.append([b.views[0].shape[0] for b in loader])
    assert sizes == [[2, 0], [2, 0], [2, 1], [2, 0], [2, 1]]


def test_a_config_on_the_0_1_scale_is_refused(folder):
    cfg = tiny_cfg(folder, "train.global_batch=4")
    unit = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=(0.485, 0.456, 0.406),
                                                             std=(0.229, 0.224, 0.225)))
    with pytest.raises(ConfigError, match=r"data.std = \(0.229, 0.224, 0.225\): is on the 0-1 scale"):
        build_train_loader(unit)
    # no normalization at all (mean 0, std 1) is not the 0-1 scale
    plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    assert len(build_train_loader(plain)) == 2


def test_a_typo_in_a_config_built_in_code_is_an_unknown_key(folder):
    """``cfg.data.image_sise = 32``: a dataclass takes any attribute, so the run used the
    default image size without a word; the same typo as an override is refused."""
    cfg = tiny_cfg(folder, "train.global_batch=4")
    cfg.data.image_sise = 32
    with pytest.raises(ConfigError, match=r"<config>: unknown key 'data.image_sise' \(valid: .*image_size"):
        build_train_loader(cfg)
    cfg = tiny_cfg(folder, "train.global_batch=4")
    cfg.views[1].mask.ratoi = 0.3
    with pytest.raises(ConfigError, match=r"unknown key 'views.1.mask.ratoi'"):
        checked(cfg)
    # the class where an instance belongs: an AttributeError from deep inside, or the defaults
    cfg = tiny_cfg(folder, "train.global_batch=4")
    with pytest.raises(ConfigError, match=r"<config>: views.1: the class ViewCfg itself where an instance belongs; write ViewCfg\(\)"):
        build_train_loader(dataclasses.replace(cfg, views=[cfg.views[0], ViewCfg]))
    with pytest.raises(ConfigError, match=r"views.0.mask: the class MaskCfg itself where an instance belongs"):
        checked(dataclasses.replace(cfg, views=[ViewCfg(mask=MaskCfg), cfg.views[1]]))


def test_small_views_are_not_refused_for_a_mask_they_never_draw(folder):
    """24 px views: the recipe's 32 px mask grid does not fit them, which matters only where
    masks are drawn: not in an evaluation loader, not with apply_mask=False, not at ratio 0."""
    cfg = tiny_cfg(folder, "train.global_batch=4", "data.image_size=24", "data.val_resize=28")
    cfg = dataclasses.replace(cfg, views=[dataclasses.replace(v, mask=MaskCfg(grid=32)) for v in cfg.views])
    with pytest.raises(ConfigError, match=r"views\[0\].mask.grid = 32: must be an integer in \[1, data.image_size=24\]"):
        build_train_loader(cfg)
    assert next(iter(build_train_loader(cfg, apply_mask=False))).views[0].shape == (4, 3, 24, 24)
    assert next(iter(build_eval_loader(cfg, str(folder), batch_size=4))).views[0].shape == (4, 3, 24, 24)
    unmasked = dataclasses.replace(cfg, views=[dataclasses.replace(v, mask=MaskCfg(ratio=0.0)) for v in cfg.views])
    assert len(build_train_loader(unmasked)) == 2


def test_two_pipelines_of_one_reader_seed_read_the_same_images(tmp_path):
    """Multi-crop (docs/PIPELINE.md): one pipeline per view size, the same reader_seed, other
    seeds and view counts; endless() keeps the two aligned across epochs."""
    from mscn.pipelines import endless

    folder = make_folder(tmp_path / "ds", classes=3, per_class=8)
    source = resolve_source(str(folder))

    def loader(views, size, seed):
        pipe = views_pipeline(source, views, image_size=size, highpass=None, batch_size=4, num_threads=1,
                              device_id=None, seed=seed, reader_seed=1234, shuffle_buffer=16)
        return DaliLoader(pipe, source, len(views), policy="drop")

    glob, local = loader([ViewCfg()] * 2, 32, seed=1), loader([ViewCfg()] * 3, 16, seed=2)
    pairs = [(g.index.tolist(), l.index.tolist(), l.views[0].shape)
             for _, g, l in zip(range(3 * len(glob)), endless(glob), endless(local))]
    assert all(a == b for a, b, _ in pairs) and pairs[0][2] == (4, 3, 16, 16)
    assert len({tuple(a) for a, _, _ in pairs}) > len(glob)  # the epochs differ: a new order each
