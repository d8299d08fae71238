"""Parity of the jitted DSP group-learning step with a plain-numpy reference.

The reference below implements spec §2.1-2.3 from the text alone, with the
network's forward and backward passes written by hand in numpy (PyTorch
layouts: OIHW kernels, (out, in) dense weights), for a tiny residual network:
stem conv -> BN -> ReLU -> [conv_a -> BN -> ReLU -> conv_b -> BN] + skip ->
ReLU -> global average pool -> dense.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dsp_jax import gates as gates_lib
from dsp_jax import group_step as gs
from dsp_jax import kernels
from dsp_jax import regularizer as reg
from models import layers

C, G, K, HW, B = 4, 2, 3, 6, 8
MOM, WD, GATE_LR, TAU, Q, LAM, T = 0.9, 1e-3, 1e-3, 0.5, 0.5, 1.0, 10
BN_EPS = 1e-5


def lr_at(t):
  return 0.05 * (1 + math.cos(math.pi * t / T)) / 2


def lr_schedule(t):
  return 0.05 * (1 + jnp.cos(jnp.pi * t / T)) / 2


class Tiny(nn.Module):
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    pd = self.param_dtype
    x = layers.Conv(C, name="stem", param_dtype=pd)(x)
    x = nn.relu(layers.BatchNorm(name="bn", param_dtype=pd)(x, train))
    y = layers.Conv(C, name="conv_a", param_dtype=pd)(x)
    y = nn.relu(layers.BatchNorm(name="bn_a", param_dtype=pd)(y, train))
    y = layers.Conv(C, name="conv_b", param_dtype=pd)(y)
    y = layers.BatchNorm(name="bn_b", param_dtype=pd)(y, train)
    x = nn.relu(x + y)
    return layers.Dense(K, name="fc", param_dtype=pd)(jnp.mean(x, (1, 2)))


# ---------------------------------------------------------------- numpy net
def _cols(x):
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return np.stack([np.stack([xp[:, a:a + h, b:b + w] for b in range(3)], -1)
                   for a in range(3)], -2)            # (B, H, W, I, 3, 3)


def conv_fwd(x, w):
  return np.einsum("bhwikl,oikl->bhwo", _cols(x), w), x


def conv_bwd(dy, x, w):
  dw = np.einsum("bhwikl,bhwo->oikl", _cols(x), dy)
  dcols = np.einsum("bhwo,oikl->bhwikl", dy, w)
  h, wd = x.shape[1:3]
  dxp = np.zeros((x.shape[0], h + 2, wd + 2, x.shape[3]))
  for a in range(3):
    for b in range(3):
      dxp[:, a:a + h, b:b + wd] += dcols[..., a, b]
  return dxp[:, 1:-1, 1:-1], dw


def bn_fwd(x, g, b, stats):
  n = x.shape[0] * x.shape[1] * x.shape[2]
  mean = x.mean((0, 1, 2))
  var = ((x - mean) ** 2).mean((0, 1, 2))
  sig = np.sqrt(var + BN_EPS)
  xh = (x - mean) / sig
  new_stats = (0.9 * stats[0] + 0.1 * mean,
               0.9 * stats[1] + 0.1 * var * n / (n - 1))
  return g * xh + b, (xh, sig, g, n), new_stats


def bn_bwd(dy, cache):
  xh, sig, g, n = cache
  dg = (dy * xh).sum((0, 1, 2))
  db = dy.sum((0, 1, 2))
  dx = g / sig / n * (n * dy - db - xh * dg)
  return dx, dg, db


def net_loss_grads(p, stats, x, y):
  """Cross-entropy, gradients of every parameter, new BN statistics."""
  h, c0 = conv_fwd(x, p["stem"])
  h, cb0, s0 = bn_fwd(h, p["bn_g"], p["bn_b"], stats["bn"])
  h0 = np.maximum(h, 0)
  a, ca = conv_fwd(h0, p["conv_a"])
  a, cba, sa = bn_fwd(a, p["bn_a_g"], p["bn_a_b"], stats["bn_a"])
  a_r = np.maximum(a, 0)
  b, cb = conv_fwd(a_r, p["conv_b"])
  b, cbb, sb = bn_fwd(b, p["bn_b_g"], p["bn_b_b"], stats["bn_b"])
  z = h0 + b
  out = np.maximum(z, 0)
  f = out.mean((1, 2))
  logits = f @ p["fc_w"].T + p["fc_b"]
  e = np.exp(logits - logits.max(1, keepdims=True))
  prob = e / e.sum(1, keepdims=True)
  n = x.shape[0]
  loss = -np.log(prob[np.arange(n), y]).mean()
  dlog = (prob - np.eye(K)[y]) / n
  g = {"fc_w": dlog.T @ f, "fc_b": dlog.sum(0)}
  df = dlog @ p["fc_w"]
  dout = np.broadcast_to(df[:, None, None, :] / (HW * HW), out.shape)
  dz = dout * (z > 0)
  db, g["bn_b_g"], g["bn_b_b"] = bn_bwd(dz, cbb)
  da_r, g["conv_b"] = conv_bwd(db, a_r, p["conv_b"])
  da = da_r * (a > 0)
  dh0a, g["bn_a_g"], g["bn_a_b"] = bn_bwd(da, cba)
  dh0, g["conv_a"] = conv_bwd(dh0a, h0, p["conv_a"])
  dh0 = dh0 + dz
  dh = dh0 * (h > 0)
  dh, g["bn_g"], g["bn_b"] = bn_bwd(dh, cb0)
  _, g["stem"] = conv_bwd(dh, x, p["stem"])
  return loss, g, {"bn": s0, "bn_a": sa, "bn_b": sb}


def np_terms(w, p):
  """Spec §2.2 in OIHW layout for one group: ℓ, N, D, d, s, ds."""
  pw = p[:, None, None, None] * w
  ell = np.sqrt((pw ** 2).sum((0, 2, 3)))
  n_ = pw / (1e-8 + ell[None, :, None, None])
  d_ = p[:, None, None, None] * n_
  d = (w * n_).sum((1, 2, 3))
  spq = (p ** Q).sum()
  s = spq ** (1 / Q)
  ds = p ** Q * s / (p * spq + 1e-8)
  return ell, n_, d_, d, s, ds


def np_pi(w, P, c):
  return c * sum(np_terms(w, P[g])[4] * np_terms(w, P[g])[2]
                 for g in range(P.shape[0]))


def np_softmax(z):
  e = np.exp(z - z.max(0))
  return e / e.sum(0)


def reference_step(st, x, y, noise):
  p, stats, mom, A, adam, t = (st["p"], st["stats"], st["mom"], st["A"],
                               st["adam"], st["t"])
  lr = lr_at(t)
  rho = LAM * lr * (t + 1) / T
  c = math.sqrt(C * HW * HW / (16 * 32 * 32)) * 3 * (G / C) ** 1.5
  P = {k: np_softmax(A[k] / TAU + noise[k]) for k in A}

  def sgd(p, g, mom):
    newm = {k: MOM * mom[k] + g[k] + WD * p[k] for k in p}
    return {k: p[k] - lr * newm[k] for k in p}, newm

  _, g, stats1 = net_loss_grads(p, stats, x, y)
  p1, mom1 = sgd(p, g, mom)
  terms = {k: [np_terms(p1[k], P[k][j]) for j in range(G)] for k in A}
  pck = dict(p1)
  for k in A:
    pck[k] = p1[k] - rho * np_pi(p1[k], P[k], c)
  _, g2, _ = net_loss_grads(pck, stats1, x, y)
  p2, _ = sgd(pck, g2, {k: v.copy() for k, v in mom1.items()})
  newA, newadam = {}, {}
  for k in A:
    w2 = p2[k]
    w3 = w2 - rho * np_pi(w2, P[k], c)
    delta = w3 - pck[k]
    gam = np.zeros((G, C))
    for j in range(G):
      ell2, _, _, d2, s2, ds2 = np_terms(w2, P[k][j])
      gam[j] = s2 * d2 + ell2.sum() * ds2
      ell, n_, d_, d, s, ds = terms[k][j]
      dd = (d_ * delta).sum((1, 2, 3))
      gam[j] += ds * dd + s * ((2 * n_ * delta).sum((1, 2, 3))
                               - d * (d_ * delta / (ell[None, :, None, None]
                                                    + 1e-8)).sum((1, 2, 3)))
    pk = P[k]
    grad = pk * (gam - (pk * gam).sum(0)) / TAU
    m, v = adam[k]
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad ** 2
    n = t + 1
    newA[k] = A[k] - GATE_LR / (1 - 0.9 ** n) * m / (
        np.sqrt(v) / math.sqrt(1 - 0.999 ** n) + 1e-12)
    newadam[k] = (m, v)
  pout = dict(p1)
  for k in A:
    H = np.eye(G)[:, np.argmax(newA[k], 0)]
    pout[k] = p1[k] - rho * np_pi(p1[k], H, c)
  return {"p": pout, "stats": stats1, "mom": mom1, "A": newA, "adam": newadam,
          "t": t + 1}


# ---------------------------------------------------------- name mapping
def to_np(params, stats, gates, mom_tree):
  oihw = lambda w: np.asarray(w).transpose(3, 2, 0, 1).astype(np.float64)
  f = lambda a: np.asarray(a).astype(np.float64)

  def flat(tr):
    return {"stem": oihw(tr["stem"]["kernel"]),
            "conv_a": oihw(tr["conv_a"]["kernel"]),
            "conv_b": oihw(tr["conv_b"]["kernel"]),
            "bn_g": f(tr["bn"]["scale"]), "bn_b": f(tr["bn"]["bias"]),
            "bn_a_g": f(tr["bn_a"]["scale"]), "bn_a_b": f(tr["bn_a"]["bias"]),
            "bn_b_g": f(tr["bn_b"]["scale"]), "bn_b_b": f(tr["bn_b"]["bias"]),
            "fc_w": f(tr["fc"]["kernel"]).T, "fc_b": f(tr["fc"]["bias"])}

  st = {k: (f(stats[k]["mean"]), f(stats[k]["var"]))
        for k in ("bn", "bn_a", "bn_b")}
  A = {k: f(gates[k]["logits"]) for k in ("conv_a", "conv_b")}
  return flat(params), st, A, flat(mom_tree)


def _momentum(state):
  return state.opt_state[1].trace


@functools.lru_cache(maxsize=None)
def _setup(dtype):
  """Model, layers, initial state and jitted step (cached: one compile)."""
  model = Tiny(param_dtype=dtype)
  x0 = jnp.zeros((1, HW, HW, 3), dtype)
  variables = model.init(jax.random.key(0), x0, train=False)
  info = kernels.analyze(model, (HW, HW, 3))
  gates = gates_lib.init_gates(info, G, key=jax.random.key(1), dtype=dtype)
  state = gs.init_group_state(variables, gates, rng=jax.random.key(2),
                              momentum=MOM, weight_decay=WD, gate_lr=GATE_LR)
  step = gs.make_group_step(model, groups=G, lam=LAM, lr_schedule=lr_schedule,
                            total_steps=T, temperature=TAU, q=Q, momentum=MOM,
                            weight_decay=WD, gate_lr=GATE_LR, layer_info=info)
  return model, info, state, step


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _compare(state, ref, tol):
  p, st, A, mom = to_np(state.params, state.batch_stats, state.gates,
                        _momentum(state))
  errs = {}
  for k in p:
    errs[f"param {k}"] = _rel(p[k], ref["p"][k])
    errs[f"momentum {k}"] = _rel(mom[k], ref["mom"][k])
  for k in st:
    errs[f"mean {k}"] = _rel(st[k][0], ref["stats"][k][0])
    errs[f"var {k}"] = _rel(st[k][1], ref["stats"][k][1])
  for k in A:
    errs[f"logits {k}"] = _rel(A[k], ref["A"][k])
  bad = {k: v for k, v in errs.items() if not v <= tol}
  assert not bad, bad


def _run(dtype, steps, tol):
  _, _, state, step = _setup(dtype)
  p, st, A, _ = to_np(state.params, state.batch_stats, state.gates,
                      _momentum(state))
  ref = {"p": p, "stats": st, "mom": {k: np.zeros_like(v) for k, v in p.items()},
         "A": A, "adam": {k: (np.zeros((G, C)), np.zeros((G, C))) for k in A},
         "t": 0}
  rs = np.random.RandomState(0)
  for _ in range(steps):
    x = rs.normal(size=(B, HW, HW, 3))
    y = rs.randint(0, K, size=B)
    noise = {k: rs.gumbel(size=(G, C)) for k in A}
    batch = {"image": jnp.asarray(x, dtype), "label": jnp.asarray(y)}
    jnoise = {k: {"logits": jnp.asarray(v, dtype)} for k, v in noise.items()}
    state, _ = step(state, batch, jnoise)
    ref = reference_step(ref, x.astype(dtype).astype(np.float64), y, noise)
    _compare(state, ref, tol)
  # The step actually moved the logits beyond plain Adam steps of ±lr.
  move = np.abs(np.asarray(state.gates["conv_a"]["logits"]) - A["conv_a"])
  assert move.max() > 0
  return state


def test_parity_float64_five_steps():
  with jax.enable_x64(True):
    state = _run(jnp.float64, 5, 1e-10)
    assert state.params["conv_a"]["kernel"].dtype == jnp.float64
    assert _momentum(state)["conv_a"]["kernel"].dtype == jnp.float64


def test_parity_float32_one_step():
  state = _run(jnp.float32, 1, 1e-5)
  assert state.params["conv_a"]["kernel"].dtype == jnp.float32


def test_exact_option_close_to_autodiff_of_regulariser():
  """The autodiff gradient ∂R/∂P matches the first-order formula Γ."""
  with jax.enable_x64(True):
    rs = np.random.RandomState(1)
    w = jnp.asarray(rs.normal(size=(3, 3, 5, 6)))
    P = jax.nn.softmax(jnp.asarray(rs.normal(size=(3, 6))), axis=0)
    terms = reg.group_terms(w, P, Q)
    auto = jax.grad(reg.regulariser_value, argnums=1)(w, P, Q)
    np.testing.assert_allclose(reg.group_gradient(terms), auto, rtol=1e-6)
    # With Δ = 0 the exact option reduces to that first-order term.
    ex = reg.exact_group_gradient(w, w, jnp.zeros_like(w), P, Q)
    np.testing.assert_allclose(ex, auto, rtol=1e-12)
    # The second-order part is the directional derivative of ∂R/∂P along Δ.
    delta = jnp.asarray(rs.normal(size=w.shape)) * 1e-2
    eps = 1e-4
    fd = (jax.grad(reg.regulariser_value, argnums=1)(w + eps * delta, P, Q)
          - jax.grad(reg.regulariser_value, argnums=1)(w - eps * delta, P, Q)
          ) / (2 * eps)
    ex = reg.exact_group_gradient(w, w, delta, P, Q)
    np.testing.assert_allclose(ex - auto, fd, rtol=1e-6, atol=1e-12)
    # The reference's hand-derived term is a different (approximate) quantity.
    assert not np.allclose(reg.second_order(terms, delta), fd, rtol=1e-3)
    # Π is c * ∂R/∂W.
    gw = jax.grad(reg.regulariser_value)(w, P, Q)
    np.testing.assert_allclose(reg.penalty(terms, 2.0), 2.0 * gw, rtol=1e-6)


def test_exact_step_runs_and_differs_only_in_logits():
  _, info, state, step_pa = _setup(jnp.float32)
  step_ex = gs.make_group_step(Tiny(), groups=G, lam=LAM,
                               lr_schedule=lr_schedule, total_steps=T,
                               temperature=TAU, q=Q, momentum=MOM,
                               weight_decay=WD, gate_lr=GATE_LR,
                               layer_info=info, exact=True)
  rs = np.random.RandomState(3)
  batch = {"image": jnp.asarray(rs.normal(size=(B, HW, HW, 3)), jnp.float32),
           "label": jnp.asarray(rs.randint(0, K, size=B))}
  a, _ = step_ex(state, batch)
  b, _ = step_pa(state, batch)
  np.testing.assert_array_equal(a.batch_stats["bn_a"]["mean"],
                                b.batch_stats["bn_a"]["mean"])
  assert np.all(np.isfinite(a.gates["conv_a"]["logits"]))
  assert a.gates["conv_a"]["logits"].shape == (G, C)


def test_noise_drawn_from_state_rng_is_deterministic_and_wrong_groups_fail():
  _, _, state, step = _setup(jnp.float32)
  rs = np.random.RandomState(4)
  batch = {"image": jnp.asarray(rs.normal(size=(B, HW, HW, 3)), jnp.float32),
           "label": jnp.asarray(rs.randint(0, K, size=B))}
  a, _ = step(state, batch)
  b, _ = step(state, batch)
  np.testing.assert_array_equal(a.gates["conv_b"]["logits"],
                                b.gates["conv_b"]["logits"])
  c, _ = step(state.replace(rng=jax.random.key(9)), batch)
  assert not np.array_equal(a.gates["conv_b"]["logits"],
                            c.gates["conv_b"]["logits"])
  bad = jax.tree.map(lambda x: jnp.zeros((G + 1, C)), state.gates)
  with pytest.raises(ValueError, match="groups"):
    step(state.replace(gates=bad, gate_opt_state=gs.gate_optimizer().init(bad)),
         batch)


_SHARDED = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as PS
sys.path.insert(0, ".")
sys.path.insert(0, "tests")
import test_dsp_group_step as t
_, info, state, step = t._setup(jnp.float32)
rs = np.random.RandomState(5)
batch = {"image": jnp.asarray(rs.normal(size=(t.B, t.HW, t.HW, 3)), jnp.float32),
         "label": jnp.asarray(rs.randint(0, t.K, size=t.B))}
ref, _ = step(state, batch)
mesh = jax.make_mesh((2,), ("data",))
rep = NamedSharding(mesh, PS())
sharded = {k: jax.device_put(v, NamedSharding(mesh, PS("data")))
           for k, v in batch.items()}
# The engine's TrainState (gate Adam state in ``extra``) works as well.
from training.state import TrainState
state = TrainState(step=state.step, params=state.params,
                   batch_stats=state.batch_stats, masks={}, gates=state.gates,
                   opt_state=state.opt_state, rng=state.rng,
                   extra={"gate_opt_state": state.gate_opt_state})
state = jax.device_put(state, rep)
out, _ = jax.jit(step, out_shardings=(rep, rep))(state, sharded)
assert int(out.step) == 1 and "gate_opt_state" in out.extra
for a, b in zip(jax.tree.leaves(out.params) + jax.tree.leaves(out.gates),
                jax.tree.leaves(ref.params) + jax.tree.leaves(ref.gates)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
assert len(out.gates["conv_a"]["logits"].sharding.device_set) == 2
print("OK")
"""


def test_step_runs_with_the_batch_sharded_over_two_devices_on_a_train_state():
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
