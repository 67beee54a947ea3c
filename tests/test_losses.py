"""The Barlow Twins loss: hand-derived values, a float64 reference, and every sharding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bt_jax import losses
from bt_jax.distributed import make_mesh

EPS = 1e-5


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


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(3)
    z1 = rng.normal(size=(N_GLOBAL, DIM)).astype(np.float32)
    z2 = (0.5 * z1 + rng.normal(size=(N_GLOBAL, DIM))).astype(np.float32)
    return z1, z2


@pytest.fixture(scope="module")
def single_device(embeddings):
    value_and_grad = jax.jit(jax.value_and_grad(losses.barlow_twins_loss, argnums=(0, 1)))
    return value_and_grad(*embeddings)


def _sharded_value_and_grad(mesh, strategy):
    def loss(z1, z2):
        return losses.barlow_twins_loss(z1, z2, mesh=mesh, strategy=strategy)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("strategy", losses.STRATEGIES)
@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_sharded_equals_single_device(embeddings, single_device, strategy, num_devices):
    assert jax.device_count() >= 8, "conftest sets 8 CPU devices"
    mesh = make_mesh(num_devices)
    sharding = NamedSharding(mesh, P("data", None))
    z1, z2 = (jax.device_put(z, sharding) for z in embeddings)
    value, grads = _sharded_value_and_grad(mesh, strategy)(z1, z2)
    ref_value, ref_grads = single_device
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        g, ref = np.asarray(g, np.float64), np.asarray(ref, np.float64)
        assert np.linalg.norm(g - ref) <= 1e-5 * np.linalg.norm(ref)
        # The projection of g on the true gradient: 1.0, not 1/num_devices (lightly #1977).
        assert np.vdot(g, ref) / np.vdot(ref, ref) == pytest.approx(1.0, abs=1e-5)


def _dot_shapes(hlo_text):
    """Output shapes of every dot in an HLO module."""
    return [
        tuple(int(s) for s in dims.split(",") if s)
        for dims in re.findall(r"= f32\[([\d,]*)\][^=]*? dot\(", hlo_text)
    ]


def test_gather_strategy_never_forms_the_whole_product(embeddings):
    mesh = make_mesh(8)
    sharding = NamedSharding(mesh, P("data", None))
    z1, z2 = (jax.device_put(z, sharding) for z in embeddings)
    compiled = _sharded_value_and_grad(mesh, "gather").lower(z1, z2).compile()
    shapes = _dot_shapes(compiled.as_text())
    assert shapes, "expected dots in the compiled module"
    # Forward: C blocks are [D, D/8]; backward: [N, D/8] and [N, D]. Never [D, D].
    assert (DIM, DIM) not in shapes, shapes
    assert (DIM, DIM // 8) in shapes, shapes
    # The all-reduce strategy, by contrast, does form D x D per device.
    compiled = _sharded_value_and_grad(mesh, "allreduce").lower(z1, z2).compile()
    assert (DIM, DIM) in _dot_shapes(compiled.as_text())


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
