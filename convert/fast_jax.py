"""Compact JAX inference of pruned models: the packing plan applied in JAX.

The masked Flax model is dense-shaped: its masks multiply the kernels and
save no time. ``compact`` lowers the same ``convert.fast.NetSpec`` the fast
PyTorch export uses (sliced convs and denses, BatchNorm folded, each layer
in its planned formulation) into a pure function of a parameter pytree, for
``jax.jit``::

  spec = convert.fast_specs.from_packed(plan, "cifar_resnet56")
  params, apply = convert.fast_jax.compact(spec)
  logits = jax.jit(apply)(params, images_nhwc)   # = the masked model's

Channel gathers and index-adds are static (numpy index constants). A
``fast.Plan`` contributes its large-batch regime's formulations (JAX has no
memory format to choose); the default is the cost model's large-batch choice
for channels-last layout (NHWC), which is what XLA runs on CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from convert import fast


def _conv(x: jax.Array, w: jax.Array, b: jax.Array, conv: fast.ConvSpec
          ) -> jax.Array:
  y = jax.lax.conv_general_dilated(
      x, w, (conv.stride, conv.stride),
      [(conv.padding, conv.padding)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + b


def compact(spec: fast.NetSpec, plan: fast.Plan | fast.Regime | None = None
            ) -> tuple[dict[str, Any], Callable[[Any, jax.Array], jax.Array]]:
  """Parameters and apply function of the lowered network.

  Args:
    spec: the network (``convert.fast_specs``).
    plan: per-layer formulations: a regime, or a plan (its large regime);
      default: ``fast.plan_regime`` at the large batch for channels_last,
      the cost model.

  Returns:
    ``(params, apply)``: a pytree of jnp arrays (conv kernels HWIO) and
    ``apply(params, images_nhwc) -> logits``, pure and jittable.
  """
  if plan is None:
    plan = fast.plan_regime(spec, fast.REGIMES["large"], ("channels_last",))
  params: dict[str, Any] = {}

  def parts_params(name: str, parts: list[fast.Part]) -> list[dict]:
    out = []
    for p in parts:
      out.append({"kernel": jnp.asarray(np.transpose(p.weight, (2, 3, 1, 0))),
                  "bias": jnp.asarray(p.bias)})
    params[name] = out
    return [None if p.gather is None else np.asarray(p.gather) for p in parts]

  def visit(kind, item, lowered):
    if kind == "pool":
      return ("pool", item)
    if kind == "conv":
      return ("conv", item, parts_params(item.name, lowered))
    main, short, index = lowered
    gathers = [parts_params(c.name, p) for c, p in zip(item.main, main)]
    sg = None if short is None else parts_params(item.shortcut.name, short)
    return ("block", item, gathers, sg, index)

  ops = fast.walk(spec, plan, visit)
  head = []
  for i, op in enumerate(spec.head):
    if op[0] == "linear":
      params[f"head.{i}"] = {"kernel": jnp.asarray(np.transpose(op[1])),
                             "bias": jnp.asarray(op[2])}
    elif op[0] == "slim_layernorm":
      params[f"head.{i}"] = {"scale": jnp.asarray(op[1]),
                             "bias": jnp.asarray(op[2]),
                             "removed": jnp.asarray(op[4])}
    head.append(op)

  def layer(p, conv, gathers, x):
    outs = [_conv(x if g is None else jnp.take(x, g, axis=3), q["kernel"],
                  q["bias"], conv) for q, g in zip(p, gathers)]
    y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return jax.nn.relu(y) if conv.relu else y

  def apply(p: dict[str, Any], x: jax.Array) -> jax.Array:
    for op in ops:
      if op[0] == "pool":
        k, s, pad = op[1].kernel, op[1].stride, op[1].padding
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1),
                                  (1, s, s, 1),
                                  [(0, 0), (pad, pad), (pad, pad), (0, 0)])
      elif op[0] == "conv":
        x = layer(p[op[1].name], op[1], op[2], x)
      else:
        _, blk, gathers, sg, index = op
        s = x if sg is None else layer(p[blk.shortcut.name], blk.shortcut, sg,
                                       x)
        if not blk.main:
          x = jax.nn.relu(s if blk.const is None else s + blk.const)
          continue
        y = x
        for conv, g in zip(blk.main, gathers):
          y = layer(p[conv.name], conv, g, y)
        x = jax.nn.relu(s + y if index is None else s.at[..., index].add(y))
    if spec.pool is None:
      x = x.mean((1, 2))
    else:
      n, h, w, c = x.shape
      f = h // spec.pool
      if f * spec.pool != h or w != h:
        raise ValueError(f"adaptive pooling {h}x{w} -> {spec.pool} needs a "
                         "multiple of the pool size")
      x = x.reshape(n, spec.pool, f, spec.pool, f, c).mean((2, 4))
      x = x.transpose(0, 3, 1, 2).reshape(n, -1)  # PyTorch's (C, H, W) order
    for i, op in enumerate(head):
      q = p.get(f"head.{i}")
      if op[0] == "linear":
        x = x @ q["kernel"] + q["bias"]
      elif op[0] == "relu":
        x = jax.nn.relu(x)
      else:
        width, eps = op[3], op[5]
        mean = (x.sum(-1, keepdims=True) + q["removed"].sum()) / width
        sq = ((x - mean) ** 2).sum(-1, keepdims=True) + (
            (q["removed"] - mean) ** 2).sum(-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(sq / width + eps) * q["scale"] + q[
            "bias"]
    return x

  return params, apply
