"""The Barlow Twins loss: hand-derived values, a float64 reference, and every sharding."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bt_jax import losses
from bt_jax.distributed import make_mesh

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import scaling  # noqa: E402  (its HLO collective counter, tested in test_bench)

EPS = 1e-5
MESHES_2D = [(8, 1), (4, 2), (2, 4), (1, 8)]


def hadamard_columns():
    """The 7 non-constant columns of the 8x8 Sylvester Hadamard matrix.

    Each has mean 0 and variance 1, and they are orthogonal.
    """
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])
    return h[:, 1:].astype(np.float32)


def reference_loss(z1, z2, lambd=0.0051):
    """The paper's formula, written out in float64 numpy."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n, d = z1.shape
    z1n = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + EPS)  # np.var is the biased variance
    z2n = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + EPS)
    c = z1n.T @ z2n / n
    on_diag = sum((1 - c[i, i]) ** 2 for i in range(d))
    off_diag = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on_diag + lambd * off_diag


def float64_reference(z1, z2, lambd=0.0051):
    """The loss and its gradients w.r.t. z1 and z2, derived by hand in float64 numpy.

    With zn = (z - mean) / sqrt(var + eps) per column (biased var, as torch's BatchNorm1d in
    train mode) and C = z1n^T z2n / N: dL/dC = G with G_ii = -2 (1 - C_ii) and
    G_ij = 2 lambd C_ij; dL/dz1n = z2n G^T / N, dL/dz2n = z1n G / N; through the
    standardisation, dL/dz = (g - mean(g) - zn mean(g zn)) / sqrt(var + eps) per column.
    test_float64_reference_is_the_official_torch_loss checks it against the official code.
    """
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n, _ = z1.shape
    std1, std2 = np.sqrt(z1.var(0) + EPS), np.sqrt(z2.var(0) + EPS)
    z1n, z2n = (z1 - z1.mean(0)) / std1, (z2 - z2.mean(0)) / std2
    c = z1n.T @ z2n / n
    off = c - np.diag(np.diag(c))
    loss = np.sum((1 - np.diag(c)) ** 2) + lambd * np.sum(off**2)
    g = 2 * lambd * off - np.diag(2 * (1 - np.diag(c)))

    def through_standardisation(grad_n, zn, std):
        return (grad_n - grad_n.mean(0) - zn * (grad_n * zn).mean(0)) / std

    grad1 = through_standardisation(z2n @ g.T / n, z1n, std1)
    grad2 = through_standardisation(z1n @ g / n, z2n, std2)
    return float(loss), grad1, grad2


def torch_reference(z1, z2, lambd=0.0051):
    """The official PyTorch loss (facebookresearch/barlowtwins main.py) in float64.

    Returns the loss and its gradients w.r.t. z1 and z2 (numpy float64).
    """
    torch = pytest.importorskip("torch")
    a, b = (torch.tensor(np.asarray(z), dtype=torch.float64, requires_grad=True) for z in (z1, z2))
    n, d = a.shape
    bn = torch.nn.BatchNorm1d(d, affine=False, dtype=torch.float64)  # train mode, eps 1e-5
    c = bn(a).T @ bn(b) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten().pow(2).sum()
    loss = on_diag + lambd * off_diag
    loss.backward()
    return loss.item(), a.grad.numpy(), b.grad.numpy()


def test_float64_reference_is_the_official_torch_loss():
    rng = np.random.default_rng(11)
    z1, z2 = rng.normal(size=(2, 24, 10))
    z2 = z2 + 0.5 * z1  # correlated views: every term of G matters
    ours, theirs = float64_reference(z1, z2), torch_reference(z1, z2)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-12)
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def assert_close(value, grads, ref_value, ref_grads, rel=1e-5):
    """Value and each gradient within `rel` of the reference (gradients in norm)."""
    assert float(value) == pytest.approx(float(ref_value), rel=rel)
    for g, ref in zip(grads, ref_grads, strict=True):
        g, ref = np.asarray(g, np.float64), np.asarray(ref, np.float64)
        assert np.linalg.norm(g - ref) <= rel * np.linalg.norm(ref)
        # The projection of g on the true gradient: 1.0, not 1/num_devices (lightly #1977).
        assert np.vdot(g, ref) / np.vdot(ref, ref) == pytest.approx(1.0, abs=rel)


def test_identical_hadamard_views_reach_the_eps_floor():
    # C_ii = 1 / (1 + eps): each diagonal term is (eps / (1 + eps))^2 ~= 1e-10, seven of them.
    z = hadamard_columns()
    assert float(losses.barlow_twins_loss(z, z)) == pytest.approx(7.0e-10, abs=1e-9)


def test_opposite_views():
    # C = -I / (1 + eps): 7 * (1 + 1 / (1 + eps))^2 = 27.99972.
    z = hadamard_columns()
    assert float(losses.barlow_twins_loss(z, -z)) == pytest.approx(27.99972, abs=1e-4)


def test_invariant_to_affine_rescaling_of_a_view():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(64, 16)).astype(np.float32)
    z2 = (z1 + rng.normal(size=(64, 16))).astype(np.float32)
    z2 /= z2.std(0)  # unit variance: the eps shift is then ~1e-5 relative per term
    base = float(losses.barlow_twins_loss(z1, z2))
    moved = float(losses.barlow_twins_loss(z1, 3 * z2 + 5))
    assert moved == pytest.approx(base, rel=2e-4)


def test_standardization_uses_the_biased_variance():
    # Column [1, -1, 1, -1]: biased variance 1 -> C_00 = 1 / (1 + eps); unbiased would give 0.75.
    z = np.array([[1.0], [-1.0], [1.0], [-1.0]], np.float32)
    c = losses.cross_correlation(z, z)
    assert c.shape == (1, 1) and c.dtype == jnp.float32
    assert float(c[0, 0]) == pytest.approx(1.0, abs=2e-5)


@pytest.mark.parametrize("n,d", [(16, 8), (50, 33), (256, 64)])
def test_matches_float64_reference(n, d):
    rng = np.random.default_rng(n + d)
    z1 = rng.normal(size=(n, d)).astype(np.float32)
    z2 = (0.7 * z1 + rng.normal(size=(n, d)) + 2.0).astype(np.float32)
    got = float(losses.barlow_twins_loss(z1, z2))
    assert got == pytest.approx(reference_loss(z1, z2), rel=1e-5)


def test_terms_add_up():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 32, 16)).astype(np.float32)
    terms = losses.barlow_twins_terms(z1, z2, lambd=0.0051)
    c = np.asarray(losses.cross_correlation(z1, z2), np.float64)
    assert float(terms.invariance) == pytest.approx(np.sum((1 - np.diag(c)) ** 2), rel=1e-5)
    off = c - np.diag(np.diag(c))
    assert float(terms.redundancy) == pytest.approx(np.sum(off**2), rel=1e-5)
    assert float(terms.loss) == pytest.approx(
        float(terms.invariance) + 0.0051 * float(terms.redundancy), rel=1e-6
    )


def test_bfloat16_inputs_are_computed_in_float32():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 32, 16)).astype(np.float32)
    low = losses.barlow_twins_loss(z1.astype(jnp.bfloat16), z2.astype(jnp.bfloat16))
    assert low.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(z, jnp.bfloat16).astype(jnp.float32)) for z in (z1, z2)]
    assert float(low) == pytest.approx(reference_loss(*rounded), rel=1e-5)


# --- sharded strategies --------------------------------------------------------------------

N_GLOBAL, DIM = 32, 64
ALL_STRATEGIES = (*losses.STRATEGIES, "auto")


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(3)
    z1 = rng.normal(size=(N_GLOBAL, DIM)).astype(np.float32)
    z2 = (0.5 * z1 + rng.normal(size=(N_GLOBAL, DIM))).astype(np.float32)
    return z1, z2


@pytest.fixture(scope="module")
def single_device(embeddings):
    """The C form on one device: value and gradients w.r.t. both views."""
    value_and_grad = jax.jit(jax.value_and_grad(losses.barlow_twins_loss, argnums=(0, 1)))
    value, grads = value_and_grad(*embeddings)
    return value, grads


@pytest.fixture(scope="module")
def float64(embeddings):
    value, *grads = float64_reference(*embeddings)
    return value, grads


def _value_and_grad(mesh, strategy):
    def loss(z1, z2):
        return losses.barlow_twins_loss(z1, z2, mesh=mesh, strategy=strategy)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _mesh_2d(shape):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def _put(arrays, mesh, spec):
    return [jax.device_put(z, NamedSharding(mesh, spec)) for z in arrays]


def _dot_shapes(hlo_text):
    """Output shapes of every dot in an HLO module."""
    return [
        tuple(int(s) for s in dims.split(",") if s)
        for dims in re.findall(r"= f32\[([\d,]*)\][^=]*? dot\(", hlo_text)
    ]


@pytest.mark.parametrize("strategy", ["gram", "gather"])
def test_one_device_matches_the_official_float64_loss_and_gradient(embeddings, float64, strategy):
    value, grads = _value_and_grad(None, strategy)(*embeddings)
    assert_close(value, grads, *float64)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_sharded_equals_single_device(embeddings, single_device, float64, strategy, num_devices):
    assert jax.device_count() >= 8, "conftest sets 8 CPU devices"
    mesh = make_mesh(num_devices)
    value, grads = _value_and_grad(mesh, strategy)(*_put(embeddings, mesh, P("data", None)))
    assert_close(value, grads, *single_device)
    assert_close(value, grads, *float64)


@pytest.mark.parametrize(
    "strategy, mesh_shape",
    [(s, (1,)) for s in ALL_STRATEGIES] + [(s, (8,)) for s in ALL_STRATEGIES] + [("gram", (2, 4))],
)
def test_every_strategy_gives_trace_c_and_the_health_statistics(embeddings, strategy, mesh_shape):
    """trace(C), and from it and the redundancy the mean C_ii and RMS C_ij (i != j) the
    train step logs, against the loss's own C in float64."""
    from bt_jax.pretrain import health_metrics

    if len(mesh_shape) == 2:
        mesh, spec = _mesh_2d(mesh_shape), P("data", "model")
    else:
        mesh, spec = make_mesh(mesh_shape[0]), P("data", None)
    terms_fn = jax.jit(lambda a, b: losses.barlow_twins_terms(a, b, mesh=mesh, strategy=strategy))
    terms = terms_fn(*_put(embeddings, mesh, spec))
    c = np.asarray(losses.cross_correlation(*embeddings), np.float64)
    off = c[~np.eye(DIM, dtype=bool)]
    assert float(terms.diagonal) == pytest.approx(np.trace(c), rel=1e-5)
    health = health_metrics(terms, DIM)
    assert float(health["c_diag_mean"]) == pytest.approx(np.mean(np.diag(c)), rel=1e-5)
    assert float(health["c_offdiag_rms"]) == pytest.approx(np.sqrt(np.mean(off**2)), rel=1e-5)


@pytest.mark.parametrize("shape", MESHES_2D)
def test_gram_on_a_data_x_model_mesh(embeddings, single_device, float64, shape):
    # Each device holds z[its rows, its D/M columns]; gradients come back sharded the same way.
    mesh = _mesh_2d(shape)
    z1, z2 = _put(embeddings, mesh, P("data", "model"))
    compiled = _value_and_grad(mesh, "gram").lower(z1, z2).compile()
    value, grads = compiled(z1, z2)
    assert_close(value, grads, *single_device)
    assert_close(value, grads, *float64)
    assert all(g.sharding.spec == P("data", "model") for g in grads)
    # No block of C: only the partial Gram z_cols z_cols^T and its backward (dG + dG^T) z_cols
    # over each device's D/8 columns.
    shapes = set(_dot_shapes(compiled.as_text()))
    c_blocks = {(DIM, DIM // w) for w in (1, 2, 4, 8)} | {(DIM // w, DIM) for w in (2, 4, 8)}
    assert not c_blocks & shapes, shapes
    assert shapes == {(N_GLOBAL, N_GLOBAL), (N_GLOBAL, DIM // 8)}, shapes
    if shape[1] > 1:  # "auto" has only gram to pick once the features are sharded
        assert losses.choose_strategy(N_GLOBAL, DIM, *shape) == "gram"


@pytest.mark.parametrize("strategy", losses.C_FORMS)
def test_c_forms_take_z_sharded_over_a_data_x_1_mesh(embeddings, single_device, strategy):
    mesh = _mesh_2d((8, 1))
    value, grads = _value_and_grad(mesh, strategy)(*_put(embeddings, mesh, P("data", "model")))
    assert_close(value, grads, *single_device)


def test_gram_pads_gram_rows_when_the_batch_does_not_divide_over_every_device():
    # N = 36 divides over data = 2, not over the 8 devices that share the Gram rows.
    rng = np.random.default_rng(4)
    z1, z2 = rng.normal(size=(2, 36, 16)).astype(np.float32)
    mesh = _mesh_2d((2, 4))
    value, grads = _value_and_grad(mesh, "gram")(*_put((z1, z2), mesh, P("data", "model")))
    value64, *grads64 = float64_reference(z1, z2)
    assert_close(value, grads, value64, grads64)


def test_gather_strategy_never_forms_the_whole_product(embeddings):
    mesh = make_mesh(8)
    z1, z2 = _put(embeddings, mesh, P("data", None))
    compiled = _value_and_grad(mesh, "gather").lower(z1, z2).compile()
    shapes = _dot_shapes(compiled.as_text())
    assert shapes, "expected dots in the compiled module"
    # Forward: C blocks are [D, D/8]; backward: [N, D/8] and [N, D]. Never [D, D].
    assert (DIM, DIM) not in shapes, shapes
    assert (DIM, DIM // 8) in shapes, shapes
    # The all-reduce strategy, by contrast, does form D x D per device.
    compiled = _value_and_grad(mesh, "allreduce").lower(z1, z2).compile()
    assert (DIM, DIM) in _dot_shapes(compiled.as_text())


@pytest.mark.parametrize("shape", MESHES_2D)
def test_gram_loss_fits_in_1_gib_per_device_at_the_paper_batch_and_d_65536(shape):
    # Compile only: value_and_grad at N = 2048, D = 65,536 on 8 devices, z P("data", "model").
    mesh = _mesh_2d(shape)
    z = jax.ShapeDtypeStruct(
        (2048, 65536), jnp.float32, sharding=NamedSharding(mesh, P("data", "model"))
    )
    memory = _value_and_grad(mesh, "gram").lower(z, z).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 2**30, memory
    # Not vacuous: most of it is [N, D/8] column blocks (64 MiB each: both views' all-to-all
    # results, standardized copies and cotangents).
    assert memory.temp_size_in_bytes > 6 * 2048 * 65536 // 8 * 4, memory


def test_strategy_cost_matches_the_compiled_program():
    # FLOPs from XLA's cost analysis (matmuls plus a few % of elementwise work) and bytes
    # from the collectives of the optimised HLO, counted as bench/scaling.py does.
    n, d = 512, 4096
    # allreduce also repeats the D^2 elementwise loss on every device (~7 % here)
    for strategy, shape, flops_slack in [
        ("gram", (8,), 1.03),
        ("gram", (2, 4), 1.03),
        ("gather", (8,), 1.03),
        ("allreduce", (8,), 1.1),
        ("jit", (8,), 1.03),
    ]:
        mesh = make_mesh(8) if len(shape) == 1 else _mesh_2d(shape)
        spec = P(*mesh.axis_names) if strategy == "gram" else P("data", None)
        z = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(mesh, spec))
        compiled = _value_and_grad(mesh, strategy).lower(z, z).compile()
        expected = losses.strategy_cost(strategy, n, d, *shape)
        flops = compiled.cost_analysis()["flops"]
        assert expected.flops <= flops <= flops_slack * expected.flops, (strategy, shape)
        sent = scaling.collectives(compiled.as_text(), devices=8)["ring_bytes"]
        # psums of a few scalars and of the C forms' per-feature statistics aside
        assert sent == pytest.approx(expected.bytes, rel=0.02), (strategy, shape)


def test_auto_picks_the_cheapest_strategy():
    # One device, no bytes: gram when 8 N^2 D < 6 N D^2, i.e. 4 N < 3 D.
    assert losses.choose_strategy(2048, 8192) == "gram"
    assert losses.choose_strategy(1600, 2048) == "allreduce"
    # N = 2048, D = 8192, W = 8: gram 8 N^2 D / 8 = 34.4 GFLOP and 16 (7/8) (N D / 8 + N^2)
    # = 84 MiB; gather 103 GFLOP and 8 (7/8) (N + N / 8) D = 126 MiB; allreduce 103 / 448.
    assert losses.choose_strategy(2048, 8192, 8) == "gram"
    # N = D = 8192, W = 8: gram 550 GFLOP / 1008 MiB, gather 412 / 504, allreduce 412 / 448.
    assert losses.choose_strategy(8192, 8192, 8) == "allreduce"
    # N = D / 2 = 4096, W = 8, in units of N D: FLOPs / 200 gram N / 200 = 20.5, the C forms
    # (6/8) D / 200 = 30.7; bytes gram 14 (1/8 + N/D) = 8.75, gather 7 (9/8) = 7.9, allreduce
    # 7 D/N = 14. Totals: gram 29.2, gather 38.6, allreduce 44.7.
    assert losses.choose_strategy(4096, 8192, 8) == "gram"
    # D = 8190 does not split over 8 devices: neither gram nor gather applies.
    assert losses.choose_strategy(2048, 8190, 8) == "allreduce"
    # Features sharded over "model": only gram applies, whatever N.
    assert losses.choose_strategy(16384, 2048, 1, 8) == "gram"


# --- numerics at the paper's batch ---------------------------------------------------------


def test_gram_stays_within_1e5_of_float64_at_the_paper_batch():
    """N = 2048 with D = 4096: the cancellation in <G1, G2> / N^2 - sum C_ii^2 is worse than
    at D = 32,768 (A = ||C||_F^2 / redundancy shrinks towards 1 as D grows: 1.06 there), and
    the measured error does not grow with the dot length (docs/benchmarks.md: 1.2e-7 at
    D = 32,768, 30 s outside this suite's budget)."""
    n, d, lambd = 2048, 4096, 0.0051
    rng = np.random.default_rng(5)
    z1 = rng.standard_normal((n, d), np.float32)
    cases = {
        "random": rng.standard_normal((n, d), np.float32),
        "near-identity": z1 + 0.01 * rng.standard_normal((n, d), np.float32),
    }
    gram = jax.jit(lambda a, b: losses.barlow_twins_terms(a, b, lambd=lambd, strategy="gram"))

    def standardised(z):  # float64, as torch's BatchNorm1d in train mode (biased var)
        z = z.astype(np.float64)
        return (z - z.mean(0)) / np.sqrt(z.var(0) + EPS)

    a = standardised(z1)
    for name, z2 in cases.items():
        c = a.T @ standardised(z2) / n
        diag = np.diag(c).copy()
        np.fill_diagonal(c, 0.0)
        redundancy = np.sum(c**2)
        loss = np.sum((1 - diag) ** 2) + lambd * redundancy
        amplification = 1 + np.sum(diag**2) / redundancy
        got = gram(z1, z2)
        assert float(got.loss) == pytest.approx(loss, rel=1e-5), name
        assert float(got.redundancy) == pytest.approx(redundancy, rel=1e-5), name
        if name == "near-identity":  # at least D = 32,768's 1 + N / D
            assert amplification > 1 + n / 32768, amplification


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_names_the_problem(embeddings):
    z1, z2 = embeddings
    with pytest.raises(ValueError, match="same shape"):
        losses.barlow_twins_loss(z1, z2[:, :8])
    with pytest.raises(ValueError, match=r"\[batch, features\]"):
        losses.barlow_twins_loss(z1[0], z2[0])
    with pytest.raises(ValueError, match="at least 2"):
        losses.barlow_twins_loss(z1[:1], z2[:1])
    with pytest.raises(ValueError, match="unknown loss strategy 'fast'"):
        losses.barlow_twins_loss(z1, z2, strategy="fast")
    mesh = make_mesh(8)
    with pytest.raises(ValueError, match="does not divide over the 8 devices"):
        losses.barlow_twins_loss(z1[:12], z2[:12], mesh=mesh)
    with pytest.raises(ValueError, match="unknown loss strategy"):
        losses.barlow_twins_loss(z1, z2, mesh=mesh, strategy="pmap")
    with pytest.raises(ValueError, match="D divisible by 8"):
        losses.barlow_twins_loss(z1[:, :12], z2[:, :12], mesh=mesh, strategy="gather")


@pytest.mark.parametrize(
    "shape,n,d,strategy,message",
    [
        ((2, 4), 32, 10, "gram", r"D=10 features over the 2 x 4 devices .* D divisible by 8"),
        ((2, 4), 32, 12, "auto", r"no loss strategy splits D=12 .* D divisible by 8"),
        ((8, 1), 12, 64, "gram", "N=12 does not divide over the 8 devices of mesh axis 'data'"),
        ((4, 2), 32, 64, "gather", "shards the features over 2 devices; use strategy='gram'"),
    ],
)
def test_bad_mesh_input_fails_before_compiling(shape, n, d, strategy, message):
    mesh = _mesh_2d(shape)
    z = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match=message):
        _value_and_grad(mesh, strategy).trace(z, z)  # tracing only: nothing compiles
