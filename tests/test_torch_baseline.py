"""bench/torch_baseline.py is the same network and step as bt_jax's, and the bench runs it.

bt_jax's initial weights go into the PyTorch model through bt_jax.export (torchvision
names); both then take the official LARS steps on the same views. Equal losses and equal
parameters afterwards mean the baseline times the same computation.
"""

import functools
import os
import sys

import jax
import numpy as np
import pytest

from bt_jax import distributed, export, optim, pretrain
from bt_jax.data import normalization, normalize
from bt_jax.defaults import load_config, pretrain_config
from bt_jax.models import build_model

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch_baseline  # noqa: E402
import train_step  # noqa: E402

STEPS = 3


def _toy_config():
    config = load_config("configs/quickstart.py:smoke")
    config.optim = pretrain_config().optim  # the official LARS (no LR clipping)
    config.loss.scale = 1.0  # the official loss is not scaled
    return config


def _torch_params(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_torch_step_equals_bt_jax_step():
    config = _toy_config()
    n, size = config.train.global_batch, config.augment.view1.image_size
    model = build_model(config.model)
    tx, _ = optim.make_optimizer(config.optim, global_batch=n, warmup_steps=10, total_steps=10**6)
    mesh = distributed.make_mesh(1)
    views = train_step.synthetic_batch(config, n)
    with jax.set_mesh(mesh):
        state = jax.jit(functools.partial(pretrain.init_state, model, tx, config, size))()
        initial = jax.device_get(state)
        batch = distributed.host_to_global(views, mesh)
        losses = []
        for _ in range(STEPS):
            state, metrics = pretrain.step_function(mesh)(
                state, batch, **pretrain.step_options(config, model, tx, mesh)
            )
            losses.append(float(metrics["loss"]))

    m, o = config.model, config.optim
    ref = torch_baseline.TorchStep(
        arch=m.arch, width=m.width, cifar_stem=m.cifar_stem, stage_sizes=m.stage_sizes,
        projector=m.projector, batch=n, image_size=size, lambd=config.loss.lambd,
        lr_weights=o.lr_weights, lr_biases=o.lr_biases, weight_decay=o.weight_decay,
        eta=o.eta, device="cpu",
    )  # fmt: skip
    backbone = export.backbone_to_torchvision(
        initial.params["backbone"], initial.batch_stats["backbone"]
    )
    projector = export.projector_to_torch(
        initial.params["projector"], initial.batch_stats["projector"]
    )
    ref.model.backbone.load_state_dict({k: torch.tensor(v) for k, v in backbone.items()})
    head = {k.removeprefix("projector."): torch.tensor(v) for k, v in projector.items()}
    ref.model.projector.load_state_dict(head)
    ref.views = [  # the same normalised views, NCHW
        torch.from_numpy(
            np.asarray(normalize(views[k], normalization.of_config(config)))
            .transpose(0, 3, 1, 2)
            .copy()
        )
        for k in ("view1", "view2")
    ]
    ref_losses = [float(ref.step()) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)

    ours = export.backbone_to_torchvision(
        jax.device_get(state.params["backbone"]), jax.device_get(state.batch_stats["backbone"])
    )
    theirs = _torch_params(ref.model.backbone)
    for name, value in ours.items():
        if name.endswith(("weight", "bias")):
            scale = max(np.abs(value).max(), 1e-3)
            np.testing.assert_allclose(theirs[name], value, atol=1e-4 * scale, err_msg=name)
    # running means agree (the running var differs by design: torch keeps the unbiased one)
    np.testing.assert_allclose(
        theirs["bn1.running_mean"], ours["bn1.running_mean"], rtol=1e-4, atol=1e-6
    )


def test_bench_compares_with_torch_in_one_run(tmp_path, capsys):
    """The documented command, at toy size: both rates, their ratio, both in the JSON."""
    argv = ["--config=configs/cifar10.py", "--width=0.25", "--baseline", "torch"]
    config = train_step.configure(train_step.parse_args(argv))
    assert (config.model.arch, config.model.projector, config.model.width) == (
        "resnet18",
        "2048-2048-2048",
        0.25,
    )
    toy = ["--stage_sizes=1", "--width=0.125", "--projector=32-32", "--batch=8"]
    steps = ["--steps=1", "--repeats=2", "--warmup=1", "--input_batches=2", "--matmul_size=64"]
    out = train_step.main([*argv, *toy, *steps, f"--json={tmp_path / 'step.json'}"])
    printed = capsys.readouterr().out
    assert "PyTorch official step" in printed and "bt_jax / PyTorch" in printed
    assert len(out["baseline"]["repeat_seconds"]) == len(out["device_step"]["repeat_seconds"])
    assert out["bt_jax_over_baseline"] == pytest.approx(
        out["device_step"]["pairs_per_s"] / out["baseline"]["pairs_per_s"]
    )
    assert out["end_to_end"]["pairs_per_s"] > 0  # the embedded dataset, read by tf.data
