"""Schedules and optimizers against the real torch.optim on CPU."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from training import optim


def _torch_lrs(scheduler_fn, steps, base_lr=1.0, momentum=0.9,
               per_epoch=None):
  """lr (and momentum) PyTorch uses for each of ``steps`` optimizer steps."""
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=base_lr, momentum=momentum)
  sched = scheduler_fn(opt)
  lrs, moms = [], []
  for t in range(steps):
    lrs.append(opt.param_groups[0]["lr"])
    moms.append(opt.param_groups[0]["momentum"])
    opt.step()
    if per_epoch is None or (t + 1) % per_epoch == 0:
      sched.step()
  return np.array(lrs), np.array(moms)


def _ours(fn, steps):
  return np.array(jax.jit(jax.vmap(fn))(jnp.arange(steps)))


def test_onecycle_lr_and_momentum_match_torch():
  total = 97
  lr_fn, mom_fn = optim.onecycle(0.1, total)
  t_lr, t_mom = _torch_lrs(
      lambda o: torch.optim.lr_scheduler.OneCycleLR(
          o, max_lr=0.1, total_steps=total, anneal_strategy="cos"),
      total)
  np.testing.assert_allclose(_ours(lr_fn, total), t_lr, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(_ours(mom_fn, total), t_mom, rtol=1e-6)
  # The cycle really cycles: peak lr at step ~0.3 T, momentum lowest there.
  assert abs(t_lr.max() - 0.1) < 1e-4
  assert t_mom.min() == pytest.approx(0.85, abs=1e-4)


def test_cosine_epoch_matches_torch_per_epoch():
  spe, epochs = 7, 12
  fn = optim.cosine_epoch(0.05, epochs, spe)
  t_lr, _ = _torch_lrs(
      lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
      spe * epochs, base_lr=0.05, per_epoch=spe)
  np.testing.assert_allclose(_ours(fn, spe * epochs), t_lr, rtol=1e-5,
                             atol=1e-9)


@pytest.mark.parametrize("epochs", [164, 9])
def test_dsp_step_schedule_matches_reference_formula(epochs):
  spe = 3

  def reference(epoch):  # Written from docs/concepts.md (DSP pretraining), per epoch.
    lr = 0.1
    if epoch >= epochs / 2:
      lr *= 0.1
    if epoch >= 3 * epochs / 4:
      lr *= 0.1
    if epoch < 2:
      lr /= 4
    return lr

  t_lr, _ = _torch_lrs(
      lambda o: torch.optim.lr_scheduler.LambdaLR(o, reference),
      spe * epochs, base_lr=1.0, per_epoch=spe)
  np.testing.assert_allclose(
      _ours(optim.dsp_step(0.1, epochs, spe), spe * epochs), t_lr, rtol=1e-6)


def test_warmup_cosine_formula():
  total, lr = 50, 3e-3
  w = 5
  want = [lr * t / w if t < w else
          lr * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))
          for t in range(total)]
  np.testing.assert_allclose(_ours(optim.warmup_cosine(lr, total), total),
                             want, rtol=1e-5, atol=1e-10)


def _params():
  rng = np.random.default_rng(0)
  return {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
          "bn": {"scale": rng.normal(size=(4,)).astype(np.float32),
                 "bias": rng.normal(size=(4,)).astype(np.float32)}}


def _trajectory(tx, torch_opt_fn, torch_sched_fn=None, steps=12):
  """Runs optax and torch on the same quadratic-ish loss; returns both."""
  params = jax.tree.map(jnp.asarray, _params())
  targets = jax.tree.map(lambda x: jnp.asarray(np.cos(np.asarray(x)) * 2),
                         params)
  loss = lambda p: sum(jnp.sum((a - b) ** 2 * (1 + jnp.abs(b)))
                       for a, b in zip(jax.tree.leaves(p),
                                       jax.tree.leaves(targets)))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)

  flat = {"conv.kernel": _params()["conv"]["kernel"],
          "bn.scale": _params()["bn"]["scale"],
          "bn.bias": _params()["bn"]["bias"]}
  tflat = {"conv.kernel": np.asarray(targets["conv"]["kernel"]),
           "bn.scale": np.asarray(targets["bn"]["scale"]),
           "bn.bias": np.asarray(targets["bn"]["bias"])}
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in flat.items()}
  opt = torch_opt_fn(tp)
  sched = torch_sched_fn(opt) if torch_sched_fn else None
  for _ in range(steps):
    opt.zero_grad()
    tl = sum(((tp[k] - torch.tensor(tflat[k])) ** 2 *
              (1 + torch.tensor(tflat[k]).abs())).sum() for k in tp)
    tl.backward()
    opt.step()
    if sched:
      sched.step()
  ours = {"conv.kernel": params["conv"]["kernel"],
          "bn.scale": params["bn"]["scale"], "bn.bias": params["bn"]["bias"]}
  return ({k: np.asarray(v) for k, v in ours.items()},
          {k: v.detach().numpy() for k, v in tp.items()})


def _assert_close(ours, theirs):
  for k in ours:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-5, atol=2e-6,
                               err_msg=k)


def test_sgd_coupled_weight_decay_with_onecycle_momentum_matches_torch():
  steps = 12
  lr_fn, mom_fn = optim.onecycle(0.05, steps)
  tx = optim.sgd_torch(lr_fn, mom_fn, weight_decay=0.1)
  ours, theirs = _trajectory(
      tx, lambda tp: torch.optim.SGD(tp.values(), lr=0.05, momentum=0.9,
                                     weight_decay=0.1),
      lambda o: torch.optim.lr_scheduler.OneCycleLR(
          o, max_lr=0.05, total_steps=steps, anneal_strategy="cos"), steps)
  _assert_close(ours, theirs)


def test_sgd_nesterov_masked_weight_decay_matches_torch():
  tx = optim.sgd_torch(0.02, 0.9, weight_decay=0.5, nesterov=True,
                       wd_mask=optim.weights_mask)
  ours, theirs = _trajectory(
      tx, lambda tp: torch.optim.SGD(
          [{"params": [tp["conv.kernel"], tp["bn.scale"]],
            "weight_decay": 0.5},
           {"params": [tp["bn.bias"]], "weight_decay": 0.0}],
          lr=0.02, momentum=0.9, nesterov=True))
  _assert_close(ours, theirs)
  # The mask matters: decaying the bias too gives a different trajectory.
  unmasked, _ = _trajectory(optim.sgd_torch(0.02, 0.9, 0.5, True), lambda tp:
                            torch.optim.SGD(tp.values(), lr=0.02))
  assert not np.allclose(unmasked["bn.bias"], ours["bn.bias"])


def test_adamw_with_warmup_cosine_matches_torch():
  steps, lr = 20, 0.01
  tx = optim.adamw(optim.warmup_cosine(lr, steps), weight_decay=0.05)
  w = int(0.1 * steps)
  ours, theirs = _trajectory(
      tx, lambda tp: torch.optim.AdamW(tp.values(), lr=lr, weight_decay=0.05),
      lambda o: torch.optim.lr_scheduler.LambdaLR(
          o, lambda t: t / w if t < w else
          0.5 * (1 + math.cos(math.pi * (t - w) / (steps - w)))), steps)
  _assert_close(ours, theirs)


def test_make_optimizer_reads_config_section():
  from training import config as config_lib
  cfg = config_lib.default_config().optim
  cfg.schedule = "onecycle"
  tx, lr_fn = optim.make_optimizer(cfg, epochs=2, steps_per_epoch=5)
  assert float(lr_fn(0)) == pytest.approx(0.1 / 25)
  params = {"w": {"kernel": jnp.ones((2, 2))}}
  state = tx.init(params)
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  # First step: update = -lr0 * (g + wd * w) with b = g + wd*w.
  np.testing.assert_allclose(u["w"]["kernel"], -(0.1 / 25) * (1 + 1e-4),
                             rtol=1e-6)
  cfg.schedule = "nope"
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.make_optimizer(cfg, epochs=2, steps_per_epoch=5)
