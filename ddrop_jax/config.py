"""Typed configuration of the DDROP algorithm.

One frozen dataclass holds every DDROP hyper-parameter; the engine's
``config.ddrop`` (an ``ml_collections.ConfigDict``) converts to it with
:meth:`DdropConfig.from_engine`. Field names are the config schema's
(``training.config``), which follows the reference's flags (``--prob``,
``--schedule``, ``--total_steps``, ``--amount``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SCHEDULES = ("constant", "cosine", "linear")
IMPORTANCES = ("norm", "weight_norm", "activation")
DENSE_DROPS = ("linear", "norm")

# Network Slimming (Liu et al., ICCV 2017) uses this L1 strength on the
# BatchNorm scales of CIFAR VGG/ResNets, the same penalty applied here. With
# SGD at lr 0.1 it moves a scale by at most 1e-5 per step, so over a typical
# DDROP phase (~10^4-10^5 steps) it can drive unimportant scales to zero
# without overpowering the task gradient of useful units.
DEFAULT_L1 = 1e-4


@dataclasses.dataclass(frozen=True)
class DdropConfig:
  """DDROP hyper-parameters.

  Attributes:
    prob: target KEEP-probability range ``(p_min, p_max)`` (the ``--prob``
      pair): at the end of the schedule the least important unit of a layer is
      kept with ``p_min``, the most important with ``p_max``.
    schedule: ``constant`` (target range from step 0), ``cosine`` or
      ``linear`` (start with keep = 1 and reach the target range at
      ``total_steps``).
    total_steps: schedule length in optimizer steps; None means one third of
      the DDROP phase's steps (resolve with :meth:`with_phase_steps`).
    importance: unit importance: ``norm`` (|scale| of a unit's norm or
      scale; the squared row norm of a layer followed by a LayerNorm),
      ``weight_norm`` (squared L2 norm of the producing conv filter / Linear
      row) or ``activation`` (running mean of |activation| kept in the
      ``ddrop_stats`` collection).
    l1: strength lambda of the L1 penalty on the DDROP layers' scales (0
      switches it off).
    l1_rank_weighted: weight the penalty of each unit by its normalised drop
      probability (see ``ddrop_jax.l1``) instead of lambda on every unit.
    amount: fraction of units pruned per layer after the DDROP phase.
    round_to: r > 1 rounds each layer's kept unit count up to a multiple of
      r (hardware-friendly widths; at most the layer's width, so slightly
      fewer units than ``amount`` are pruned); 0 or 1: off.
    target_latency: > 0: ``amount`` is chosen (one for every layer, before
      rounding) so that the predicted latency of the pruned network is this
      fraction of the dense one (``ddrop_jax.latency``); 0: ``amount`` as
      given.
    prune_residual: also prune the convs feeding residual sums (each norm
      right after them on its own), as the reference code does.
    dense_drop: where a hidden Linear unit that a LayerNorm follows (VGG's
      CIFAR classifier) is dropped: ``linear`` (on the Linear's output, as
      the reference: the norm then maps a dropped unit to its shift, not to
      0) or ``norm`` (on the norm's output, so a dropped unit is 0 as after
      pruning). Importance is the Linear's row norm either way.
  """

  prob: tuple[float, float] = (0.0, 0.95)
  schedule: str = "constant"
  total_steps: int | None = None
  importance: str = "norm"
  l1: float = DEFAULT_L1
  l1_rank_weighted: bool = False
  amount: float = 0.5
  round_to: int = 0
  target_latency: float = 0.0
  prune_residual: bool = False
  dense_drop: str = "linear"

  def __post_init__(self):
    prob = tuple(float(p) for p in self.prob)
    if len(prob) != 2:
      raise ValueError(f"ddrop.prob must be a pair (p_min, p_max), got "
                       f"{self.prob!r}")
    object.__setattr__(self, "prob", prob)
    p_min, p_max = prob
    if not 0.0 <= p_min <= p_max <= 1.0:
      raise ValueError(
          "ddrop.prob = (p_min, p_max) are keep probabilities and need "
          f"0 <= p_min <= p_max <= 1, got {self.prob!r}")
    _check_choice("schedule", self.schedule, SCHEDULES)
    _check_choice("importance", self.importance, IMPORTANCES)
    _check_choice("dense_drop", self.dense_drop, DENSE_DROPS)
    if self.total_steps is not None and (
        not isinstance(self.total_steps, int) or self.total_steps < 1):
      raise ValueError(f"ddrop.total_steps must be an integer >= 1 or None, "
                       f"got {self.total_steps!r}")
    if not self.l1 >= 0.0:
      raise ValueError(f"ddrop.l1 must be >= 0, got {self.l1!r}")
    if not 0.0 <= self.amount <= 1.0:
      raise ValueError(f"ddrop.amount must be in [0, 1], got {self.amount!r}")
    if (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
        or self.round_to < 0):
      raise ValueError(f"ddrop.round_to must be an integer >= 0, got "
                       f"{self.round_to!r}")
    if not 0.0 <= self.target_latency < 1.0:
      raise ValueError(f"ddrop.target_latency must be in [0, 1), got "
                       f"{self.target_latency!r}")

  @property
  def p_min(self) -> float:
    return self.prob[0]

  @property
  def p_max(self) -> float:
    return self.prob[1]

  def with_phase_steps(self, phase_steps: int) -> DdropConfig:
    """Fills in the default ``total_steps``: one third of the DDROP phase.

    Args:
      phase_steps: optimizer steps of the DDROP phase.

    Returns:
      A copy with ``total_steps`` set (unchanged if it was given).
    """
    if self.total_steps is not None:
      return self
    if phase_steps < 1:
      raise ValueError(f"phase_steps must be >= 1, got {phase_steps}")
    return dataclasses.replace(self, total_steps=max(1, phase_steps // 3))

  @classmethod
  def from_engine(cls, ddrop: Mapping[str, Any] | Any) -> DdropConfig:
    """See :func:`from_engine`."""
    return from_engine(ddrop)

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> DdropConfig:
    """Builds the config from a dict or ``ConfigDict`` with the same fields.

    Unknown keys raise an error naming the valid ones (a typo must not be
    silently ignored).
    """
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(vars(cfg))
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(items) - set(names))
    if unknown:
      raise ValueError(f"unknown ddrop config field(s) {unknown}; valid: "
                       f"{', '.join(names)}")
    if "prob" in items:
      items["prob"] = tuple(items["prob"])
    return cls(**items)


# Engine ``config.ddrop`` fields that are phase settings, not algorithm ones.
_PHASE_FIELDS = ("epochs", "lr", "weight_decay", "momentum", "optimizer",
                 "before_epochs", "ft_epochs", "ft_lr")


def from_engine(ddrop: Mapping[str, Any] | Any) -> DdropConfig:
  """The ``DdropConfig`` of the engine's ``config.ddrop`` section.

  Phase settings (epochs, lr, ...) are not part of the algorithm and are
  skipped; ``total_steps = 0`` means one third of the phase (None here).

  Args:
    ddrop: the ``config.ddrop`` ConfigDict (or a dict).

  Returns:
    The config (``total_steps`` still to resolve with ``with_phase_steps``).
  """
  items = {k: v for k, v in dict(ddrop.items()).items()
           if k not in _PHASE_FIELDS}
  if items.get("total_steps") == 0:
    items["total_steps"] = None
  return DdropConfig.from_mapping(items)


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"ddrop.{field} must be one of {', '.join(choices)}; "
                     f"got {value!r}")
