"""The DSP group regulariser of one layer (spec §2.2), as pure functions.

Shapes: ``W`` is one conv kernel in HWIO layout ``(k, k, I, O)`` (a dense
kernel as ``(1, 1, I, O)``, see ``kernels.kernel``); ``P`` is a
group assignment ``(G, O)`` (soft or hard). The per-group quantities carry a
leading group axis: ``ell (G, I)``, ``N, D (G, k, k, I, O)``, ``d, ds (G, O)``,
``s (G,)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dsp_jax import kernels as kernels_lib

Array = jax.Array
PyTree = Any

EPS = 1e-8


class GroupTerms(NamedTuple):
  """The spec's ℓ, N, D, d, s, ds for every group of one layer."""

  ell: Array
  N: Array
  D: Array
  d: Array
  s: Array
  ds: Array


def layer_scale(conv: kernels_lib.LayerInfo, groups: int) -> float:
  """``c = sqrt(insize_l) * k * (G / O) ** 1.5``."""
  return (math.sqrt(kernels_lib.insize(conv)) * conv.kernel_size[0]
          * (groups / conv.out_features) ** 1.5)


def group_terms(W: Array, P: Array, q: float = 0.5) -> GroupTerms:
  """ℓ, N, D, d, s, ds of spec §2.2 for all groups.

  Args:
    W: HWIO kernel ``(k, k, I, O)``.
    P: group assignment ``(G, O)``.
    q: order of the group-size quasi-norm.

  Returns:
    The terms, each with a leading group axis.
  """
  p = P[:, None, None, None, :]                       # (G, 1, 1, 1, O)
  pW = p * W[None]                                    # (G, k, k, I, O)
  ell = jnp.sqrt(jnp.sum(jnp.square(pW), axis=(1, 2, 4)))   # (G, I)
  N = pW / (EPS + ell[:, None, None, :, None])
  D = p * N
  d = jnp.sum(W[None] * N, axis=(1, 2, 3))            # (G, O)
  pq = jnp.power(P, q)
  sum_pq = jnp.sum(pq, axis=1, keepdims=True)         # (G, 1)
  s = jnp.power(sum_pq[:, 0], 1.0 / q)                # (G,)
  ds = pq * s[:, None] / (P * sum_pq + EPS)
  return GroupTerms(ell, N, D, d, s, ds)


def penalty(terms: GroupTerms, c: float) -> Array:
  """Weight penalty ``Π(W, P) = c * Σ_g s_g D_g`` (HWIO)."""
  return c * jnp.einsum("g,ghwio->hwio", terms.s, terms.D)


def group_gradient(terms: GroupTerms) -> Array:
  """First-order group term ``Γ_g = s_g d_g + (Σ_i ℓ_{g,i}) ds_g`` (G, O)."""
  return (terms.s[:, None] * terms.d
          + jnp.sum(terms.ell, axis=1, keepdims=True) * terms.ds)


def second_order(terms: GroupTerms, delta: Array) -> Array:
  """The step-9 correction, with the 1e-8 in the division by ℓ_i (§5).

  ``ds Σ(D Δ) + s (Σ(2 N Δ) − d Σ(D Δ / ℓ_i))``, sums over (h, w, i).
  """
  D_delta = terms.D * delta[None]
  sum_dd = jnp.sum(D_delta, axis=(1, 2, 3))
  sum_nd = jnp.sum(2.0 * terms.N * delta[None], axis=(1, 2, 3))
  sum_dl = jnp.sum(D_delta / (terms.ell[:, None, None, :, None] + EPS),
                   axis=(1, 2, 3))
  return terms.ds * sum_dd + terms.s[:, None] * (sum_nd - terms.d * sum_dl)


def regulariser_value(W: Array, P: Array, q: float = 0.5) -> Array:
  """``R(W, P) = Σ_g s_g Σ_i ℓ_{g,i}``, differentiable at zero channels."""
  pW = P[:, None, None, None, :] * W[None]
  sq = jnp.sum(jnp.square(pW), axis=(1, 2, 4))
  pos = sq > 0
  ell = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
  s = jnp.power(jnp.sum(jnp.power(P, q), axis=1), 1.0 / q)
  return jnp.sum(s * jnp.sum(ell, axis=1))


def exact_group_gradient(W: Array, W_prime: Array, delta: Array, P: Array,
                         q: float = 0.5) -> Array:
  """``∂R/∂P(W′) + (∂²R/∂P∂W)(W)·Δ`` by autodiff (the ``exact`` option).

  Args:
    W: the step-3 kernel.
    W_prime: the look-ahead kernel W′.
    delta: Δ = W″ − W_ck.
    P: soft assignment.
    q: quasi-norm order.

  Returns:
    The group gradient ``(G, O)``.
  """
  grad_p = jax.grad(regulariser_value, argnums=1)
  first = grad_p(W_prime, P, q)
  _, second = jax.jvp(lambda w: grad_p(w, P, q), (W,), (delta,))
  return first + second


def penalise(params: PyTree, assignments: dict, rho: Array,
             info: kernels_lib.Graph, groups: int, q: float = 0.5) -> PyTree:
  """``W ← W − ρ Π(W, P)`` for every taking-part layer.

  Args:
    params: the ``params`` tree.
    assignments: ``{path: P (G, O)}``.
    rho: the ramp ρ_t.
    info: the model's graph.
    groups: G.
    q: quasi-norm order.

  Returns:
    The penalised params.
  """
  for conv in info.taking_part:
    W = kernels_lib.kernel(params, conv)
    terms = group_terms(W, assignments[conv.path], q)
    W = W - rho * penalty(terms, layer_scale(conv, groups)).astype(W.dtype)
    params = kernels_lib.with_kernel(params, conv, W)
  return params
