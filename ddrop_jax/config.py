"""Typed configuration of the DDROP algorithm.

One frozen dataclass holds every DDROP hyper-parameter; the engine's
``config.ddrop`` (an ``ml_collections.ConfigDict``) converts to it with
:meth:`DdropConfig.from_mapping`. Field names follow the reference's flags
(``--prob``, ``--schedule``, ``--total_steps``, ``--amount``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SCHEDULES = ("constant", "cosine", "linear")
CRITERIA = ("abs_gamma", "weight_norm", "activation")
L1_MODES = ("uniform", "rank")
PRUNE_SCOPES = ("ddrop_layers", "all")
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
    criterion: unit importance: ``abs_gamma`` (|gamma| of a norm, squared row
      norm of a Linear), ``weight_norm`` (squared L2 norm of the producing
      conv filter / Linear row) or ``activation`` (running mean of
      |activation| kept in the ``ddrop_stats`` collection).
    l1: strength lambda of the L1 penalty on the DDROP layers' norm scales
      (0 switches it off).
    l1_mode: ``uniform`` (lambda on every unit) or ``rank`` (lambda times the
      unit's normalised drop probability, see ``ddrop_jax.l1``).
    amount: fraction of units pruned per layer after the DDROP phase.
    prune_scope: ``ddrop_layers`` (the DDROP layers only) or ``all`` (also
      every other conv+norm pair, e.g. convs feeding residual sums, as the
      reference code does).
    dense_drop: where a hidden Linear unit that a LayerNorm follows (VGG's
      CIFAR classifier) is dropped: ``linear`` (on the Linear's output, as
      the reference: the norm then maps a dropped unit to its shift, not to
      0) or ``norm`` (on the norm's output, so a dropped unit is 0 as after
      pruning). Importance is the Linear's row norm either way.
  """

  prob: tuple[float, float] = (0.0, 0.95)
  schedule: str = "constant"
  total_steps: int | None = None
  criterion: str = "abs_gamma"
  l1: float = DEFAULT_L1
  l1_mode: str = "uniform"
  amount: float = 0.5
  prune_scope: str = "ddrop_layers"
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
    _check_choice("criterion", self.criterion, CRITERIA)
    _check_choice("l1_mode", self.l1_mode, L1_MODES)
    _check_choice("prune_scope", self.prune_scope, PRUNE_SCOPES)
    _check_choice("dense_drop", self.dense_drop, DENSE_DROPS)
    if self.total_steps is not None and (
        not isinstance(self.total_steps, int) or self.total_steps < 1):
      raise ValueError(f"ddrop.total_steps must be an integer >= 1 or None, "
                       f"got {self.total_steps!r}")
    if not self.l1 >= 0.0:
      raise ValueError(f"ddrop.l1 must be >= 0, got {self.l1!r}")
    if not 0.0 <= self.amount <= 1.0:
      raise ValueError(f"ddrop.amount must be in [0, 1], got {self.amount!r}")

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
# Engine ``config.ddrop.importance`` -> ``DdropConfig.criterion``.
_ENGINE_IMPORTANCE = {"norm": "abs_gamma", "weight_norm": "weight_norm",
                      "activation": "activation"}


def from_engine(ddrop: Mapping[str, Any] | Any) -> DdropConfig:
  """The ``DdropConfig`` of the engine's ``config.ddrop`` section.

  Maps ``importance`` (``norm`` -> ``abs_gamma``), ``l1_rank_weighted``
  (-> ``l1_mode``), ``prune_residual`` (-> ``prune_scope='all'``) and
  ``total_steps = 0`` (-> None, one third of the phase); phase settings
  (epochs, lr, ...) are not part of the algorithm and are skipped.

  Args:
    ddrop: the ``config.ddrop`` ConfigDict (or a dict).

  Returns:
    The config (``total_steps`` still to resolve with ``with_phase_steps``).
  """
  items = {k: v for k, v in dict(ddrop.items()).items()
           if k not in _PHASE_FIELDS}
  if "importance" in items:
    imp = items.pop("importance")
    if imp not in _ENGINE_IMPORTANCE:
      raise ValueError(f"ddrop.importance must be one of "
                       f"{', '.join(_ENGINE_IMPORTANCE)}; got {imp!r}")
    items["criterion"] = _ENGINE_IMPORTANCE[imp]
  if "l1_rank_weighted" in items:
    items["l1_mode"] = "rank" if items.pop("l1_rank_weighted") else "uniform"
  if "prune_residual" in items:
    items["prune_scope"] = "all" if items.pop("prune_residual") else (
        "ddrop_layers")
  if items.get("total_steps") == 0:
    items["total_steps"] = None
  return DdropConfig.from_mapping(items)


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"ddrop.{field} must be one of {', '.join(choices)}; "
                     f"got {value!r}")
