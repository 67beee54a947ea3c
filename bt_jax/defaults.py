"""The config trees every job reads: pretraining (the paper's ImageNet recipe, value by
value) and the evaluation protocols (the official evaluate.py's hyper-parameters).

Config files under configs/ start from these and state what they change. Every field is
overridable on the command line: `--config.train.global_batch=1024`; an unknown field is an
error at flag parsing, before anything runs. Config files import this module while flags
are parsed; its own imports are ml_collections, numpy, bt_jax.data.config and
bt_jax.data.normalization (TensorFlow-free).

Some fields mean "from the data" until the job starts, because a config file cannot see
the command line's overrides (get_config runs before them): model.normalization "auto"
(the dataset's name picks the statistics) and, in configs/imagenet.py, optim.lr_weights and
lr_biases 0.0 (the authors' learning rate for train.global_batch: BATCH_SIZE_TABLE).
resolve_pretrain_config fills them in; the pretraining job runs, prints (--dry_run) and
checkpoints the resolved config.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections
import numpy as np

from bt_jax.data import normalization
from bt_jax.data.config import data_config, imagenet_views

# The repository root: relative config paths that do not exist from the working directory
# are looked up here, so `configs/quickstart.py` works from anywhere inside a checkout.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of "path/to/config.py[:variant]", as `--config=` builds it.

    The one loader behind main's error messages, the benchmarks and the tests: the file's
    get_config(variant) (or get_config() without a variant).
    """
    path, _, variant = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(_ROOT, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {spec.partition(':')[0]!r}")
    module_spec = importlib.util.spec_from_file_location("_bt_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def parse_variant(variant: str, config: str, choices: tuple[str, ...] = ()) -> str:
    """The variant of `--config=configs/<config>.py:<variant>`: "" (none) or one of choices.

    Every config file's get_config(variant="") starts with it, so a misspelt variant is one
    clear error naming the ones that exist.
    """
    if variant and variant not in choices:
        known = f"choose one of {', '.join(choices)}" if choices else "it has none"
        raise ValueError(f"unknown variant {variant!r} of configs/{config}.py; {known}")
    return variant


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            arch="resnet50",  # resnet18 / 34 / 50 / 101 / 152, torchvision layout
            width=1.0,  # channel multiplier (1 = torchvision's widths)
            cifar_stem=False,  # 3x3 stride-1 stem without max-pool, for 32 px images
            stage_sizes=(),  # blocks per stage; () = the arch's (override for toy models)
            projector="8192-8192-8192",
            dtype="bfloat16",  # compute dtype; parameters, BN statistics, C and loss: fp32
            # input mean/std: "auto" (by config.data.dataset: cifar* -> "cifar10", else
            # "imagenet"), "imagenet" or "cifar10" (bt_jax/data/normalization.py)
            normalization="auto",
        )
    )


def knn_config() -> ml_collections.ConfigDict:
    """The kNN monitor / job: cosine similarity on L2-normalised backbone features."""
    return ml_collections.ConfigDict(
        dict(
            every_epochs=0,  # online monitor during pretraining; 0 = only at the end
            at_end=True,
            k=200,
            temperature=0.1,  # votes weighted by exp(similarity / temperature)
            bank_split="",  # "" = data.train_split (no augmentation: eval preprocessing)
            query_split="",  # "" = data.eval_split
            image_size=224,
            global_batch=512,
        )
    )


def pretrain_config() -> ml_collections.ConfigDict:
    """Barlow Twins on ImageNet, ResNet-50, 8192-8192-8192, batch 2048, 1000 epochs."""
    config = ml_collections.ConfigDict()
    config.job = "pretrain"
    config.seed = 0

    config.model = model_config()
    config.loss = ml_collections.ConfigDict(
        dict(
            lambd=0.0051,
            scale=1.0,  # gradients come from scale * loss (solo-learn's CIFAR recipe: 0.1)
            # auto: the cheapest exact computation for N, D and the mesh (bt_jax/losses.py);
            # gram (never forms C), gather, allreduce or jit (the C forms) by name.
            strategy="auto",
        )
    )
    # The device mesh: "model" devices shard the projector (bt_jax/models/parallel.py),
    # the "data" axis gets devices / model; 1 = data-parallel only.
    config.mesh = ml_collections.ConfigDict(dict(model=1))
    config.optim = ml_collections.ConfigDict(
        dict(
            name="lars",
            # times global_batch / 256; 0.0 = the authors' rate for the batch (BATCH_SIZE_TABLE)
            lr_weights=0.2,
            # biases and BN parameters, times global_batch / 256; 0.0 = lr_weights x 0.024
            lr_biases=0.0048,
            weight_decay=1.5e-6,  # paper; the official main.py default is 1e-6
            momentum=0.9,
            eta=0.001,
            warmup_epochs=10,
            end_factor=0.001,  # the cosine ends at lr * end_factor
            clip_lr=False,  # solo-learn's LARS variant (CIFAR recipe)
            # The official code's gradient is 1/W of the true one (W = its GPU count), which
            # with LARS acts like weight decay x W and lr_biases / W. W here reproduces those
            # dynamics on any device count; 0 = the true global-batch gradient.
            reference_world_size=0,
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            global_batch=2048,
            epochs=1000,
            stop_after_steps=0,  # >0: stop early (smoke runs); the schedule still spans epochs
            log_every_steps=100,
            checkpoint_every_steps=2000,
            keep_checkpoints=3,
            async_checkpoints=True,
            device_prefetch=2,
            debug_nan_at_step=0,  # >= 1: multiply that step's loss by NaN (tests); 0 = off
            debug_step_delay_s=0.0,  # host sleep after each step (tests that kill a run)
            wandb_project="",  # log to this Weights & Biases project too ("" = off)
            # online linear probe on stop-gradient view-1 backbone features (pretrain.py):
            # "auto" = on when the dataset has labels, "on" (an error without), "off"
            online_probe="auto",
            online_probe_lr=0.3,  # SGD momentum 0.9, times global_batch / 256, lr schedule's shape
        )
    )
    config.data = data_config("imagenet2012")
    config.augment = imagenet_views(224)
    config.knn = knn_config()
    return config


def validate_pretrain_config(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError, one line per bad field naming it and an accepted value.

    The pretraining job calls it before it opens the data or compiles anything; so does
    `python -m bt_jax.main --dry_run`. Names that other modules own (architectures, loss
    strategies) are imported from them here, not while a config file loads.
    """
    from bt_jax.losses import STRATEGIES
    from bt_jax.models import ARCHS, parse_projector

    problems = []

    def need(ok: bool, field: str, rule: str) -> None:
        if not ok:
            problems.append(f"config.{field}={_field(config, field)!r}: {rule}")

    def positive(field: str, example) -> None:
        value = _field(config, field)
        need(math.isfinite(value) and value > 0, field, f"must be > 0, e.g. {example}")

    def at_least(field: str, low, example) -> None:
        value = _field(config, field)
        need(math.isfinite(value) and value >= low, field, f"must be >= {low}, e.g. {example}")

    train, optim, model = config.train, config.optim, config.model
    for field, example in [
        ("train.global_batch", 2048),
        ("train.epochs", 1000),
        ("train.log_every_steps", 100),
        ("train.checkpoint_every_steps", 2000),
        ("train.device_prefetch", 2),
        ("optim.eta", 0.001),
        ("train.online_probe_lr", 0.3),
        ("loss.scale", 1.0),
        ("model.width", 1.0),
        ("knn.k", 200),
        ("knn.temperature", 0.1),
        ("knn.global_batch", 512),
        ("knn.image_size", 224),
    ]:
        positive(field, example)
    for field, low, example in [
        ("train.keep_checkpoints", 1, 3),
        ("train.stop_after_steps", 0, "0 (no early stop)"),
        ("train.debug_nan_at_step", 0, "0 (off)"),
        ("train.debug_step_delay_s", 0, 0.0),
        ("optim.weight_decay", 0, 1.5e-6),
        ("optim.warmup_epochs", 0, 10),
        ("optim.lr_weights", 0, "0.2 (0.0: from the batch-size table)"),
        ("optim.lr_biases", 0, "0.0048 (0.0: lr_weights x 0.024)"),
        ("optim.reference_world_size", 0, "0 (the true gradient)"),
        ("loss.lambd", 0, 0.0051),
        ("knn.every_epochs", 0, "0 (only at the end)"),
        ("data.num_streams", 0, "0 (one per process)"),
    ]:
        at_least(field, low, example)
    need(0 <= optim.momentum < 1, "optim.momentum", "must be in [0, 1), e.g. 0.9")
    need(0 <= optim.end_factor <= 1, "optim.end_factor", "must be in [0, 1], e.g. 0.001")
    need(optim.name == "lars", "optim.name", "the one optimizer is 'lars'")
    if optim.lr_weights == 0 and train.global_batch < BATCH_SIZE_TABLE_MIN:
        need(
            False,
            "optim.lr_weights",
            f"0.0 takes the authors' rate for train.global_batch={train.global_batch}, but "
            f"their table starts at {BATCH_SIZE_TABLE_MIN}: give a rate, e.g. 1.0",
        )
    need(
        train.online_probe in PROBE_MODES,
        "train.online_probe",
        f"one of {', '.join(PROBE_MODES)}",
    )
    need(
        model.normalization in normalization.CHOICES,
        "model.normalization",
        f"one of {', '.join(normalization.CHOICES)}",
    )
    if math.isfinite(optim.warmup_epochs) and train.epochs > 0:
        need(
            optim.warmup_epochs < train.epochs,
            "optim.warmup_epochs",
            f"must be below train.epochs={train.epochs}, e.g. {train.epochs // 10}",
        )
    strategies = (*STRATEGIES, "auto")  # the computations, and auto, which picks one
    need(config.loss.strategy in strategies, "loss.strategy", f"one of {', '.join(strategies)}")
    shards = config.mesh.model
    need(
        isinstance(shards, int) and shards >= 1,
        "mesh.model",
        "the devices that shard the projector: a divisor of the device count, e.g. 1 or 8",
    )
    if isinstance(shards, int) and shards > 1:
        need(
            config.loss.strategy in ("gram", "auto"),
            "loss.strategy",
            f"with mesh.model={shards} the features are sharded: 'gram' or 'auto' (the C "
            "forms need whole rows of z)",
        )
    need(model.arch in ARCHS, "model.arch", f"one of {', '.join(ARCHS)}")
    stages = tuple(model.stage_sizes)
    need(
        len(stages) <= 4 and all(isinstance(s, int) and s >= 1 for s in stages),
        "model.stage_sizes",
        "() for the arch's own, or 1 to 4 positive block counts, e.g. (1, 1)",
    )
    try:
        widths = parse_projector(model.projector)
    except ValueError:
        need(False, "model.projector", "layer widths joined by '-', e.g. '8192-8192-8192'")
    else:
        if isinstance(shards, int) and shards > 1 and any(w % shards for w in widths):
            need(
                False,
                "model.projector",
                f"every width must be divisible by mesh.model={shards}, which splits each "
                f"layer's features, e.g. {'-'.join(str(-(-w // shards) * shards) for w in widths)}",
            )
    need(
        model.dtype in _COMPUTE_DTYPES,
        "model.dtype",
        f"one of {', '.join(_COMPUTE_DTYPES)} (parameters stay float32)",
    )
    augment = config.augment
    need(augment.pixel_ops in ("host", "device"), "augment.pixel_ops", "'host' or 'device'")
    for view in ("view1", "view2"):
        positive(f"augment.{view}.image_size", 224)
        for key, value in augment[view].items():
            if key.endswith("_prob"):
                need(0 <= value <= 1, f"augment.{view}.{key}", "a probability in [0, 1]")
    if problems:
        raise ValueError("\n".join(problems))


# Compute dtypes of the model (parameters, BN statistics and the loss are float32 anyway).
_COMPUTE_DTYPES = ("bfloat16", "float32", "float16")
PROBE_MODES = ("auto", "on", "off")


def resolve_pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a valid pretraining config with its "from the data" fields filled in.

    model.normalization "auto" -> the preset the dataset's name selects; optim.lr_weights
    0.0 -> batch_size_recipe(train.global_batch)'s; optim.lr_biases 0.0 -> lr_weights x
    MARCH_2021_SCALE_LOSS (the authors' own translation: 0.2 -> 0.0048).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.normalization = normalization.resolve(
        config.model.normalization, config.data.dataset
    )
    if config.optim.lr_weights == 0:
        config.optim.lr_weights = batch_size_recipe(config.train.global_batch)["lr_weights"]
    if config.optim.lr_biases == 0:
        config.optim.lr_biases = round(config.optim.lr_weights * MARCH_2021_SCALE_LOSS, 12)
    return config


# ---------------------------------------------------------------------------------------
# The authors' learning rate per batch size.
#
# Measured (facebookresearch/barlowtwins issue #7, J. Zbontar, 2021-03-24: "Here is a table
# of the best learning rate we found for a number of batch sizes (and 300 epochs of
# training)"): ResNet-50, ImageNet, 300 epochs, lambd 0.0051, projector 8192-8192-8192,
# with the code of March 2021 (main.py at f13c949 / 633dc56). That code has one learning
# rate for every parameter, `--learning-rate` (times batch / 256, as today), multiplies the
# loss by `--scale-loss` s = 0.024 and decays weights by `--weight-decay` 1e-6 (its
# default; the command sets neither LR groups nor decay). The top-1 column is the
# linear evaluation on ImageNet.
#
# Today's code (since 046eec3, 2021-06-02) has no loss scale and two rates, lr_weights and
# lr_biases (biases and BN parameters). Through LARS, with L the March rate and g the
# gradient of the unscaled loss (both codes also divide it by the GPU count W, see
# optim.reference_world_size; W is not recorded for these runs):
# - weights: LARS steps along d = s g + wd p scaled to eta ||p|| / ||d||, so the step is
#   eta ||p|| (g + (wd / s) p) / ||g + (wd / s) p||: s cancels except in the decay balance.
#   lr_weights = L, with weight decay wd / s = 1e-6 / 0.024 = 4.17e-5 for the same step;
# - biases and BN: no trust ratio, the step is L s g: lr_biases = s L.
# The authors translated their 2048 run this way (0.2 -> 0.2 / 0.0048) but kept weight
# decay 1e-6, i.e. 1/s = 41.7 times less decay relative to the gradient than the table's
# runs had (the README checkpoint, 73.5 % after 1000 epochs, was trained so; barlowtwins
# issue #23: the "mathematically equivalent formulation does not yield the same accuracy",
# which the decay balance would explain). So batch_size_recipe gives lr_weights = L and
# lr_biases = s L for today's code, and reports the decay that would make the step the
# measured one; configs keep their own weight decay (configs/imagenet.py: 1.5e-6 or 1e-6).
#
# Between the measured batches the rate is interpolated linearly in log2(batch); from 64 to
# 128 towards the rate the authors suggested, not measured, for 64 ("judging from the
# table, a reasonable learning rate for a batch size of 64 would be 1.0"); above 4096 it
# stays 0.2 (2048 and 4096 agree); below 64 there is no recipe.

BATCH_SIZE_TABLE = (  # (global batch, March-2021 --learning-rate, ImageNet linear top-1 %)
    (128, 0.7, 69.7),
    (256, 0.4, 70.7),
    (512, 0.3, 71.4),
    (1024, 0.25, 71.7),
    (2048, 0.2, 71.4),
    (4096, 0.2, 70.7),
)
BATCH_SIZE_TABLE_EPOCHS = 300
SUGGESTED_LR_AT_64 = 1.0  # the authors' guess in the same comment, not a measurement
BATCH_SIZE_TABLE_MIN = 64
MARCH_2021_SCALE_LOSS = 0.024
MARCH_2021_WEIGHT_DECAY = 1e-6


def batch_size_recipe(global_batch: int) -> dict:
    """Today's two-LR form of the authors' table at `global_batch` (see above).

    {"lr_weights", "lr_biases": base rates (times batch / 256, as every config's),
     "equivalent_weight_decay": the decay that gives the table's weight step with no loss
     scale (wd 1e-6 / 0.024), "source": "measured", "interpolated" or "extrapolated",
     "top1": the authors' ImageNet top-1 after 300 epochs where measured, else None}.
    """
    if global_batch < BATCH_SIZE_TABLE_MIN:
        raise ValueError(
            f"the authors' batch-size table starts at {BATCH_SIZE_TABLE_MIN}; batch "
            f"{global_batch} needs its own --config.optim.lr_weights"
        )
    measured = {batch: (lr, top1) for batch, lr, top1 in BATCH_SIZE_TABLE}
    if global_batch in measured:
        lr, top1 = measured[global_batch]
        source = "measured"
    else:
        top1 = None
        points = [(BATCH_SIZE_TABLE_MIN, SUGGESTED_LR_AT_64)] + [b[:2] for b in BATCH_SIZE_TABLE]
        batches, rates = zip(*points, strict=True)
        lr = float(np.interp(math.log2(global_batch), np.log2(batches), rates))
        inside = BATCH_SIZE_TABLE[0][0] < global_batch < BATCH_SIZE_TABLE[-1][0]
        source = "interpolated" if inside else "extrapolated"
    return {
        "lr_weights": lr,
        "lr_biases": round(lr * MARCH_2021_SCALE_LOSS, 12),
        "equivalent_weight_decay": MARCH_2021_WEIGHT_DECAY / MARCH_2021_SCALE_LOSS,
        "source": source,
        "top1": top1,
    }


def _field(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


# ---------------------------------------------------------------------------------------
# Evaluation: the fields every evaluation job reads, then one section per protocol.


def eval_config(job: str, dataset: str = "imagenet2012") -> ml_collections.ConfigDict:
    """Fields every evaluation job reads; the protocol's own section is added by the caller.

    The backbone: exactly one of pretrained_workdir (a bt_jax pretraining run's --workdir;
    pretrained_step: its checkpoint step, -1 = the latest) and pretrained_torchvision (a
    torchvision / timm ResNet state dict, .safetensors or .pth, e.g. the official Barlow
    Twins resnet50.pth; the architecture is inferred from it: bt_jax/evaluation/backbone.py).
    backbone_dtype: compute dtype, "" = the pretraining config's (a workdir) or float32 (a
    file: what torch evaluates it in; "bfloat16" is faster). backbone_normalization: the
    input mean/std, "" = the backbone's own (its pretraining run's, recorded in the
    checkpoint, whatever dataset is evaluated; ImageNet's for a file, the torchvision/timm
    convention), or a preset (bt_jax/data/normalization.py) for a file trained otherwise.
    random_init: evaluate a freshly initialised backbone of the same architecture instead of
    the trained weights (the baseline every SSL number should be compared with), its BN
    running statistics re-estimated on the evaluated dataset's training images (precise BN:
    the mean over random_init_bn.batches batches of random_init_bn.global_batch images,
    eval preprocessing, of each BN layer's train-mode batch statistics; 0 batches keeps the
    initial mean 0 / variance 1, which no trained network has); expected_arch: "" or an arch
    name ("resnet50"): refuse a backbone of another architecture; overwrite: replace the
    results of an earlier evaluation in the same --workdir.
    """
    config = ml_collections.ConfigDict()
    config.job = job
    config.seed = 0
    config.pretrained_workdir = ""
    config.pretrained_step = -1
    config.pretrained_torchvision = ""
    config.backbone_dtype = ""
    config.backbone_normalization = ""
    config.random_init = False
    config.random_init_bn = ml_collections.ConfigDict(dict(batches=50, global_batch=256))
    config.expected_arch = ""
    config.overwrite = False
    config.log_every_steps = 50
    config.data = data_config(dataset)
    return config


def _head_training(overrides: dict, **fields) -> ml_collections.ConfigDict:
    """What the linear and fine-tuning protocols share: SGD with momentum, a cosine per
    epoch, the batch the learning rates are scaled to (lr * global_batch / 256), eval."""
    cfg = ml_collections.ConfigDict(
        dict(
            global_batch=256,
            momentum=0.9,
            image_size=224,
            eval_batch=256,
            eval_every_epochs=1,
            **fields,
        )
    )
    cfg.update(overrides)
    return cfg


def linear_config(**overrides) -> ml_collections.ConfigDict:
    """The official linear protocol (evaluate.py --weights freeze; configs/linear_eval.py)."""
    return _head_training(
        overrides,
        mode="images",  # "images": the paper's protocol; "fast_features": quick check
        epochs=100,
        lr=0.3,  # for batch 256
        weight_decay=1e-6,
    )


def finetune_config(**overrides) -> ml_collections.ConfigDict:
    """The official fine-tuning protocol (evaluate.py --weights finetune;
    configs/semi_supervised.py): every layer trained, BN in train mode."""
    return _head_training(
        overrides,
        # labelled fraction: 0 = the dataset's train split as it is (ImageNet: the TFDS
        # imagenet2012_subset/1pct or /10pct); > 0 = a stratified fraction of it
        fraction=0.0,
        epochs=20,
        lr_backbone=0.005,  # for batch 256
        lr_head=0.5,  # for batch 256
        weight_decay=0.0,
    )


def transfer_config(**overrides) -> ml_collections.ConfigDict:
    """Transfer to another dataset: which protocols, at what resolution, scored how."""
    cfg = ml_collections.ConfigDict(
        dict(
            protocols=("linear", "finetune"),  # or ("svm",) for multi-label datasets
            metric="top1",  # the dataset's convention: "top1" or "mean_per_class"
            image_size=224,
            eval_batch=256,
            # logistic regression on frozen features (L-BFGS), L2 chosen on a held-out part
            linear=dict(
                heldout_fraction=0.2,
                l2_grid=tuple(float(v) for v in 10.0 ** -np.arange(0.0, 7.0)),
                max_iter=500,
            ),
            # VOC07: per-class linear SVMs (sklearn's liblinear) as VISSL's benchmark runs
            # them (eval_resnet_8gpu_transfer_voc07_svm.yaml; bt_jax/evaluation/svm.py)
            svm=dict(
                resize=256,  # shorter side to 256, then the whole image to image_size^2
                center_crop=False,  # True: center crop instead (barlowtwins#32's config)
                costs=(0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0),
                folds=3,  # cross_val_score(cv=3): unshuffled stratified folds
                max_iter=2000,
                sort_by="image/filename",  # VISSL's row order (its folds): sorted names
            ),
            label_key="labels",
            positive_key="labels_no_difficult",
        )
    )
    cfg.update(overrides)
    return cfg
