"""The one typed configuration schema of mscn: every key, its type and its default.

:mod:`mscn.config` builds a :class:`Config` from defaults -> YAML -> ``a.b=value``
overrides and re-exports every name of this module; :mod:`mscn.config_checks` holds
the range checks.

Paper references: views and masks (§5.2, Fig. 3), high-pass (§5.1, App. B),
SimCLR/BYOL recipes (App. A.1), linear probe (A.2), fine-tuning (A.3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# ImageNet statistics (0-255 scale): the normalization applied before the high-pass.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class MaskCfg:
    """Grid/focal/channel-independent/noisy mask of one view (paper §5.2).

    Paper values: ratio 0.15 (Fig. 5a), grid 32 (Fig. 5b), p_focal 0.4 (Fig. 5c),
    "high" p_ind (Fig. 5d). Ours: p_ind 0.8, p_noise and noise_std (the paper gives
    no numbers), and the per-view asymmetry of the default view list.
    """

    ratio: float = 0.15  # fraction of grid cells masked; 0 disables masking of this view
    grid: int = 32  # cell size in pixels
    random_offset: bool = True  # shift the grid by a random (dy, dx) in [0, grid)
    p_focal: float = 0.4  # probability that the mask is one contiguous block of cells
    focal_aspect: tuple[float, float] = (0.5, 2.0)  # aspect-ratio range of the block
    p_ind: float = 0.8  # probability that every channel draws its own mask
    p_noise: float = 0.5  # probability that masked values are N(0, noise_std^2), else 0
    noise_std: float = 0.25  # std of the noise, in high-passed normalized units


@dataclass
class ViewCfg:
    """Augmentations of one view (SimCLR/BYOL recipe, paper App. A.1) + its mask."""

    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_window: int = 0  # 0: DALI derives 2*ceil(3*sigma)+1 per sample from the drawn sigma
    solarize_prob: float = 0.0
    mask: MaskCfg = field(default_factory=MaskCfg)

    def blur_movable(self) -> bool:
        """Whether ``data.blur_where=loader`` moves this view's blur to the loader: it blurs
        at all, and no solarize follows the blur (the blur commutes with the normalization,
        not with solarize; mscn/blur.py)."""
        return self.blur_prob > 0 and self.solarize_prob <= 0

    def colour_movable(self, blur_in_loader: bool) -> bool:
        """Whether ``data.colour_where=loader`` moves this view's colour jitter and grayscale
        to the loader (mscn/colour.py): it has either, and nothing that DALI would apply
        after them is left in DALI: a blur only if the loader blurs too (``blur_in_loader``:
        ``data.blur_where`` resolved to ``loader`` for this loader; the view's blur then
        moves with its colour, solarize or not), and a solarize (BYOL) moves with them."""
        return self.has_colour() and (self.blur_prob <= 0 or blur_in_loader)

    def has_colour(self) -> bool:
        """Whether the view has a colour jitter or a grayscale at all."""
        return self.jitter_prob > 0 or self.grayscale_prob > 0


def default_views() -> list[ViewCfg]:
    """2 main + 2 extra masked views (paper §5.2 "Multicrops"), asymmetric masks.

    Main view 0 is masked strongly, main view 1 weakly (asymmetric augmentation,
    Wang et al. 2022 as used in §5.2); the two extra views use the paper's ratio.
    BYOL's blur/solarize asymmetry (1.0/0.1 and 0.0/0.2) is set in byol_r50_in1k.yaml.
    """
    return [
        ViewCfg(mask=MaskCfg(ratio=0.15, p_noise=0.5)),
        ViewCfg(mask=MaskCfg(ratio=0.05, p_noise=0.2)),
        ViewCfg(mask=MaskCfg(ratio=0.15, p_noise=0.5)),
        ViewCfg(mask=MaskCfg(ratio=0.15, p_noise=0.5)),
    ]


# the settings of DALI's executor that data.op_concurrency / data.stream_policy name
# (nvidia.dali.pipeline.OperatorConcurrency / StreamPolicy, lower-cased; tuning.py maps them)
OP_CONCURRENCY = ("none", "backend", "full")
STREAM_POLICIES = ("single", "per_backend", "per_operator")
HANDOVERS = ("trainer", "private")  # data.handover: the stream DALI's outputs are taken on


@dataclass
class DataCfg:
    """Where the images come from and how the loader runs (paper App. A.1 trains on
    ImageNet-1k; ``synthetic`` is the embedded stand-in). ``num_threads`` and
    ``hw_decoder_load`` default to "auto": measured choices per machine, docs/PERFORMANCE.md."""
    root: str = ""  # ImageFolder root, a file list from `mscn data scan`, or a folder of .tar shards
    format: str = "auto"  # auto | folder | filelist | wds
    val_root: str = ""  # evaluation data (same formats)
    synthetic: bool = False  # use (and create if absent) the embedded synthetic dataset
    synthetic_dir: str = "data/synth"  # where the synthetic dataset lives
    synthetic_classes: int = 10
    synthetic_per_class: int = 100
    synthetic_val_per_class: int = 30
    synthetic_size: tuple[int, int] = (500, 375)  # width, height of synthetic JPEGs
    image_size: int = 224  # side of every view
    val_resize: int = 256  # eval: resize shorter side, then center-crop image_size
    # "auto" for both is resolved per machine by mscn.pipelines.tuning (docs/PERFORMANCE.md
    # says which measurements chose the rules)
    num_threads: int | str = "auto"  # DALI CPU threads per pipeline, or "auto"
    hw_decoder_load: float | str = "auto"  # share of JPEGs for the GPU's hardware JPEG decoder, or "auto"
    prefetch: int = 2  # DALI prefetch queue depth
    shuffle_buffer: int = 4096  # DALI random_shuffle buffer (samples) for file/wds readers
    output_dtype: str = "auto"  # float32 | float16 | bfloat16 | auto (float16 on the GPU path, float32 on the CPU path)
    # how the views' random-resized crops are cut: rrc (DALI's fused fn.random_resized_crop,
    # 13 % faster on an H200) | window (fn.random_crop_generator + an ROI resize, which
    # exposes the window); the same windows either way (tests/test_pipeline_crop.py)
    crop: str = "rrc"
    # where the views' Gaussian blur (App. A.1) runs: pipeline (DALI's fn.gaussian_blur) |
    # loader (per-sample batched GEMMs on the views' device, mscn/blur.py; views with
    # solarize keep DALI's; the high-pass then runs in the loader too, after the blur) |
    # auto (loader on the GPU path when the high-pass is on and not pinned to DALI: two H200
    # runs fed the trainer faster so, docs/PERFORMANCE.md; pipeline on the CPU path).
    # A run resolves auto when it starts, and its config.yaml records the choice
    blur_where: str = "auto"
    # where the views' colour jitter and grayscale (App. A.1) run: pipeline (DALI's
    # fn.color_twist, two conditional passes) | loader (one kernel per view on the views'
    # device, the same arithmetic as DALI's, mscn/colour.py; DALI then only decodes and
    # crops). A view moves if it does not blur or data.blur_where resolves to loader: its
    # blur and a solarize after it (BYOL) move with it; the high-pass then runs in the
    # loader. pipeline until a GPU run measures loader (bench stage masks-colour-loader,
    # docs/PERFORMANCE.md)
    colour_where: str = "pipeline"
    # DALI's executor (docs/PERFORMANCE.md, "Tuning"): which independent operators may run at
    # once, none | backend (a CPU op beside a GPU op: DALI's default) | full (also the views'
    # GPU branches beside each other), and its CUDA streams, single | per_backend (DALI's
    # default) | per_operator (one per independent branch). Same outputs either way (tested
    # on the CPU path and, round 4, on an H200); "auto" is DALI's default: round 4 found no
    # difference it could resolve between the settings (docs/PERFORMANCE.md)
    op_concurrency: str = "auto"
    stream_policy: str = "auto"
    # restrict DALI's CPU worker threads to cores (DALI's set_affinity): to the cores NVML
    # reports near the card (within those this process may use), or one per thread from the
    # DALI_AFFINITY_MASK variable; without NVML DALI warns and pins nothing. Same outputs;
    # off until a GPU run measures it (bench --sweep affinity=false,true, docs/PERFORMANCE.md)
    thread_affinity: bool = False
    # take the training batches on a background thread, 2 ahead, each with its loader state
    # (mscn.pipelines.feeder): the trainer's thread then never waits in the loader. Same
    # batches and exact resume (tested); off until a GPU run shows a gain (bench feed
    # masks-thread, docs/PERFORMANCE.md)
    feed_thread: bool = False
    # which CUDA stream takes DALI's outputs (the DLPack handover): trainer (the current
    # stream, as DALI's iterator does: that stream then also waits for every kernel DALI
    # queued since, the next batches' included) | private (a stream of the loader's own:
    # DALI's share_outputs already waited on the host until the batch was done, so the
    # trainer's stream gets no wait at all). Same batches; trainer until a GPU run measures
    # private (bench feed masks-private, docs/PERFORMANCE.md)
    handover: str = "trainer"
    # read the first and last bytes of every training image (a file, or a tar shard's member)
    # before training (mscn.data.filecheck; the ranks split them): DALI 2.4's CPU decoder can
    # segfault, with no message, when two it cannot decode meet in one batch. Off for a set
    # known to be sound when the reads cost too much (docs/PIPELINE.md, "Bad input"). A
    # restart with the files unchanged takes their stat instead (mscn.data.checkstamp)
    check_files: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class HighPassCfg:
    """x - GaussianBlur(x, sigma) after normalization (paper §5.1, sigma=5 from App. B)."""

    enabled: bool = True
    sigma: float = 5.0
    window: int = 0  # 0: 2*ceil(3*sigma)+1 (31 for sigma=5)
    # where the filter runs: auto (in DALI on the GPU path, as two matmuls in the loader on
    # the CPU path, and in the loader for a loader whose views' blur moved there with
    # data.blur_where=loader) | pipeline (always in DALI) | loader (always as matmuls, on
    # the views' device: on a GPU that is the trainer's stream, as batched GEMMs)
    where: str = "auto"


@dataclass
class ModelCfg:
    arch: str = "resnet50"  # resnet18 | resnet34 | resnet50
    proj_hidden: int = 2048
    proj_out: int = 256
    pred_hidden: int = 4096  # BYOL predictor
    sync_bn: bool = True  # SyncBatchNorm under DDP


@dataclass
class MethodCfg:
    name: str = "simclr"  # simclr | byol
    temperature: float = 0.2  # InfoNCE (SimCLR)
    ema_base: float = 0.996  # BYOL target momentum at step 0, cosine to ema_final
    ema_final: float = 1.0


@dataclass
class OptimCfg:
    name: str = "lars"  # lars | sgd
    base_lr: float = 0.3  # per 256 images: lr = base_lr * global_batch / 256 (SimCLR: 4.8 at 4096)
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coef: float = 0.001  # LARS eta
    # multi-tensor LARS step and BYOL EMA (~10 calls per group) vs a per-parameter loop
    # (~12 calls per weight tensor); the same numbers on the CPU (train/lars.py)
    foreach: bool = True


@dataclass
class ScheduleCfg:
    epochs: int = 800
    warmup_epochs: int = 10
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr


@dataclass
class TrainCfg:
    """How a pretraining run is driven (paper App. A.1: batch 4096, 800 epochs for SimCLR and 1000 for BYOL); the
    recipe files set the paper's values, these defaults only what the recipe leaves out."""
    global_batch: int = 4096
    out_dir: str = ""  # run directory; "": runs/<recipe>-<YYYYmmdd-HHMMSS> (pass it again to resume)
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True  # GPU only
    priority_stream: bool = False  # GPU only: train on a high-priority CUDA stream (measured: no gain, PERFORMANCE.md)
    compile: bool = False
    max_steps: int = 0  # >0: stop after this many optimizer steps (smoke tests)
    ckpt_every_steps: int = 500
    keep_last: int = 2  # checkpoints kept (final.pt is a hard link to the last, not a copy)
    log_every: int = 10
    tensorboard: bool = False
    knn_every_epochs: int = 0  # >0: online kNN monitor on data.val_root
    # a rank whose batch, step, checkpoint or monitor lasts this long says so and writes its
    # threads' stacks to out_dir/stalls/ (train/watchdog.py); 0: off
    stall_warn_s: float = 300.0  # under NCCL's 10-min timeout, which aborts the waiting peers


@dataclass
class EvalCfg:
    """The evaluation protocols of paper §6.1–6.2: linear probe (App. A.2), fine-tuning
    on 1 % of labels (App. A.3), and the kNN monitor used between epochs."""
    # linear probe / transfer (paper A.2)
    linear_epochs: int = 100
    linear_lr: float = 1.0  # scaled by batch / 256
    linear_batch: int = 256
    linear_weight_decay: float = 1e-6
    precompute_features: bool = False  # center-crop features once (not equivalent to A.2's random crops)
    # semi-supervised fine-tuning (paper A.3)
    finetune_epochs: int = 20
    finetune_backbone_lr: float = 0.002
    finetune_head_lr: float = 0.5
    finetune_milestones: tuple[int, int] = (12, 16)
    finetune_gamma: float = 0.2
    finetune_batch: int = 256
    label_fraction: float = 0.01
    # kNN monitor (InstDisc / DINO)
    knn_k: int = 20
    knn_temperature: float = 0.07


@dataclass
class Config:
    """One run's whole configuration: the data, the views and their masks (paper §5.1–5.3),
    the model, method, optimizer and schedule (App. A.1), training and evaluation.

    Built from a recipe with :func:`mscn.config.load_config`, which rejects unknown keys,
    wrong types and out-of-range values in one line each."""

    data: DataCfg = field(default_factory=DataCfg)
    views: list[ViewCfg] = field(default_factory=default_views)
    highpass: HighPassCfg = field(default_factory=HighPassCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def blur_where_on(self, gpu: bool) -> str:
        """``data.blur_where`` resolved for the GPU path (``gpu``) or the CPU path: ``auto``
        is ``loader`` on a GPU when the high-pass is on and may run in the loader (it must
        follow the blur there), else ``pipeline``."""
        if self.data.blur_where != "auto":
            return self.data.blur_where
        hp = self.highpass
        return "loader" if gpu and hp.enabled and hp.where != "pipeline" else "pipeline"

    def resolved_for(self, gpu: bool) -> "Config":
        """This config with the ``auto`` choices that change what a run computes made
        concrete for the GPU path (``gpu``) or the CPU path: a run saves this one, so that
        its ``config.yaml`` says what ran and a resume elsewhere (another device, another
        mscn default) is compared with that (train/rundir.py)."""
        where = self.blur_where_on(gpu)
        if where == self.data.blur_where:
            return self
        return dataclasses.replace(self, data=dataclasses.replace(self.data, blur_where=where))

    def blur_in_loader(self, gpu: bool, views: list[ViewCfg] | None = None) -> bool:
        """Whether a loader of ``views`` (default: the training views) on the GPU path
        (``gpu``) or the CPU path blurs in the loader: :meth:`blur_where_on` is ``loader``
        and at least one view's blur can move (:meth:`ViewCfg.blur_movable`, or with its colour
        step under ``data.colour_where=loader``). The one rule
        for the config check, the loader's plan and the resume guard, which must agree on
        the pipeline graph."""
        # a view's blur moves alone (no solarize after it), or with its colour step
        # (data.colour_where=loader: a solarize after the blur moves too)
        colour = self.data.colour_where == "loader"
        return self.blur_where_on(gpu) == "loader" and any(
            v.blur_movable() or (colour and v.has_colour() and v.blur_prob > 0)
            for v in (self.views if views is None else views))

    def colour_in_loader(self, gpu: bool, views: list[ViewCfg] | None = None) -> bool:
        """Whether a loader of ``views`` (default: the training views) on the GPU path
        (``gpu``) or the CPU path applies the colour jitter and grayscale itself:
        ``data.colour_where`` is ``loader`` and at least one view's colour can move
        (:meth:`ViewCfg.colour_movable`, given where this loader blurs). Like
        :meth:`blur_in_loader`, the one rule of the config check, the plan and the resume guard."""
        views = self.views if views is None else views
        blur = self.blur_in_loader(gpu, views)
        return self.data.colour_where == "loader" and any(v.colour_movable(blur) for v in views)

    def colour_where_note(self, gpu: bool) -> str | None:
        """One line for a run whose ``data.colour_where=loader`` moves no view's colour on
        this path (GPU: ``gpu``), saying why, so that the setting does not look applied."""
        if self.data.colour_where != "loader" or self.colour_in_loader(gpu):
            return None
        where = self.blur_where_on(gpu)
        if where != "loader" and any(v.has_colour() for v in self.views):  # they would move with the blur
            why = f"the views blur in DALI here (data.blur_where resolves to {where}): add data.blur_where=loader"
        else:
            why = "no view has a colour jitter or grayscale"
        return f"data.colour_where=loader moves no view's colour on the {'GPU' if gpu else 'CPU'} path: {why}"
