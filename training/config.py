"""The configuration schema: every field, its type, default, valid values, doc.

This table is the ONE place where run configuration is defined.
``configs/base.py`` builds the ``ConfigDict`` from it (``default_config()``),
config files override a few fields, and ``validate(config)`` rejects unknown
fields and invalid values before any work starts, naming the field and the
valid choices or range.

Sections:

* top level: what to run (``method``, ``stages``), data, model, the plain
  training recipe (``epochs`` + ``optim``), checkpointing and logging;
* ``optim``: optimizer and schedule of ``method='train'`` (see
  ``training/optim.py`` for the formulas);
* ``dsp``: Dynamic Structure Pruning (defaults: ``docs/concepts.md``);
* ``ddrop``: dynamic dropout pruning (defaults: ``docs/concepts.md``).

Mapping of the original command-line flags to fields:

=====================  ==========================================
DDROP flag             field
=====================  ==========================================
--dataset              dataset
--data-dir             data_dir
--model                model
--prob MIN MAX         ddrop.prob (a (min, max) tuple of KEEP probabilities)
--schedule             ddrop.schedule
--total_steps          ddrop.total_steps (optimizer steps; 0 = 1/3 of phase)
--batch-size           batch_size
--test-batch-size      test_batch_size
--epochs               ddrop.epochs
--lr                   ddrop.lr
--weight-decay         ddrop.weight_decay
--before-epochs        ddrop.before_epochs
--amount               ddrop.amount
--ft-epochs            ddrop.ft_epochs
--ft-lr                ddrop.ft_lr
--seed                 seed
=====================  ==========================================

=====================  ==========================================
DSP flag               field
=====================  ==========================================
-l/--layers L          model = 'cifar_resnet{L}'
-g/--groups            dsp.groups
-r/--regularize        dsp.regularize (λ)
--temperature          dsp.temperature (τ)
-p/--prune-rate        dsp.prune_rate
--cycles               dsp.cycles
--momentum             dsp.momentum
--wd                   dsp.pretrain_wd / dsp.group_wd / dsp.finetune_wd
--lr                   dsp.pretrain_lr / dsp.group_lr / dsp.finetune_lr
--epochs               dsp.pretrain_epochs / dsp.group_epochs /
                       dsp.finetune_epochs
--batch-size           batch_size
--save-dir             workdir
=====================  ==========================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections

METHODS = ("train", "dsp", "ddrop")
# Stage names per method, in execution order; ``stages='all'`` runs them all.
STAGES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dsp": ("pretrain", "group", "prune_finetune", "pack"),
    "ddrop": ("before", "ddrop", "prune", "finetune", "pack"),
}
DATASETS = ("digits", "cifar10", "cifar100", "fashion_mnist", "imagenet2012")
IMAGEFOLDER_PREFIX = "imagefolder:"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "dsp_step", "cosine_epoch", "onecycle",
             "warmup_cosine")
WD_MASKS = ("all", "weights")
DTYPES = ("float32", "bfloat16")

# Fields that change how a run is watched or stored, not its numbers; they are
# left out of the config hash so that, e.g., a resumed run may log more often.
RUNTIME_FIELDS = ("workdir", "stages", "checkpoint_every_steps",
                  "keep_checkpoints", "log_every_steps", "eval_every_epochs",
                  "progress_bar", "worker_count", "max_steps", "multihost",
                  "coordinator_address", "num_processes", "process_id",
                  "distributed_timeout")


class ConfigError(ValueError):
  """An unknown field or an invalid value in a run configuration."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One configuration field.

  Attributes:
    default: default value; its Python type is the field's type (an int
      default also accepts nothing but ints, a float default accepts ints).
    doc: what the field means.
    choices: the valid values, when the field is an enumeration.
    min: smallest valid value (numbers, or each element of a tuple).
    max: largest valid value.
    length: required tuple length.
    check: extra check ``value -> error message or None``.
  """

  default: Any
  doc: str
  choices: tuple[Any, ...] | None = None
  min: float | None = None
  max: float | None = None
  length: int | None = None
  check: Callable[[Any], str | None] | None = None


def _model_name(name: str) -> str | None:
  import models  # Imported lazily: the schema must load without JAX work.
  try:
    models.model_spec(name)
  except ValueError as e:
    return str(e)
  return None


def _json_object(value: str) -> str | None:
  if not value.strip():
    return None
  try:
    got = json.loads(value)
  except json.JSONDecodeError as e:
    return f"needs a JSON object, got {value!r} ({e.msg})"
  if not isinstance(got, dict):
    return f"needs a JSON object, got {value!r}"
  return None


def _dataset(name: str) -> str | None:
  if name in DATASETS or (name.startswith("tfds:") and len(name) > 5):
    return None
  if name.startswith(IMAGEFOLDER_PREFIX) and len(name) > len(
      IMAGEFOLDER_PREFIX):
    return None
  return (f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, "
          f"tfds:<name>, {IMAGEFOLDER_PREFIX}<path>")


def _stages(value: str) -> str | None:
  names = [s.strip() for s in value.split(",")]
  valid = sorted({s for v in STAGES.values() for s in v} | {"all"})
  bad = [s for s in names if s not in valid]
  if bad:
    return (f"unknown stage(s) {bad}; valid: {', '.join(valid)} "
            "(comma-separated)")
  return None


def _below_one(value: float) -> str | None:
  # Pruning every unit of a layer would cut the network.
  if value >= 1.0:
    return f"{value!r} is out of the valid range [0, 1) (needs < 1)"
  return None


def _index_list(value: str) -> str | None:
  parts = [v.strip() for v in value.split(",")] if value.strip() else []
  if not all(p.isdigit() for p in parts):
    return f"needs comma-separated non-negative integers, got {value!r}"
  return None


def _widths(value: str) -> str | None:
  parts = [v.strip() for v in value.split(",")] if value.strip() else []
  if not all(p.isdigit() and int(p) > 0 for p in parts):
    return f"needs comma-separated positive integers, got {value!r}"
  return None


def parse_widths(value: str) -> tuple[int, ...]:
  """The ``widths`` field as a tuple (empty when '')."""
  return tuple(int(v) for v in value.split(",")) if value.strip() else ()


def _prob_pair(value: tuple[float, float]) -> str | None:
  if value[0] > value[1]:
    return f"needs min <= max, got {value}"
  return None


F = Field
SCHEMA: dict[str, Any] = {
    # What to run.
    "method": F("train", "Pipeline: plain training, DSP or DDROP.", METHODS),
    "stages": F("all", "Comma-separated stages of the method to run "
                "(see STAGES), or 'all'.", check=_stages),
    "workdir": F("runs/default", "Output directory (checkpoints, metrics, "
                 "report); the --workdir flag overrides it."),
    "seed": F(42, "Random seed (init, data order, augmentation).", min=0),
    # Data.
    "dataset": F("digits", "Dataset name: digits, cifar10, cifar100, "
                 "fashion_mnist (28x28x1, from the four IDX files in data_dir "
                 "or /usr/share/datasets/fashion-mnist), or "
                 "tfds:<name> (an array_record tfds dataset in data_dir); "
                 "encoded images: imagenet2012 (tfds's, prepared in "
                 "array_record in data_dir) or imagefolder:<path> (a "
                 "<path>/train|val/<class>/*.JPEG tree).",
                 check=_dataset),
    "data_dir": F("", "Dataset root directory ('' = the data module's "
                  "default location)."),
    "batch_size": F(128, "Global training batch size (all devices).", min=1),
    "test_batch_size": F(100, "Evaluation batch size.", min=1),
    "validation_from_train": F(0, "Training examples held out as a validation "
                               "split (0 = none).", min=0),
    "select_on": F("test", "Split whose accuracy selects the best checkpoint.",
                   ("test", "validation")),
    "worker_count": F(0, "Data loader worker processes (0 = in process).",
                      min=0),
    # Encoded-image datasets (imagenet2012, imagefolder:): host transforms.
    "image_size": F(224, "Encoded images: training RandomResizedCrop size, "
                    "evaluation center-crop size, model input size.", min=8),
    "eval_resize": F(256, "Encoded images: shorter side before the "
                     "evaluation center crop (>= image_size).", min=8),
    "randaugment_ops": F(2, "Encoded images: RandAugment ops per training "
                         "image (0 = off).", min=0),
    "randaugment_magnitude": F(9, "Encoded images: RandAugment magnitude "
                               "bin (of 31).", min=0, max=30),
    "strict_images": F(False, "imagefolder: an undecodable image fails "
                       "preparation (else it is skipped and counted)."),
    # Training targets.
    "label_smoothing": F(0.0, "Label smoothing of the training targets "
                         "(0 = off).", min=0.0, max=1.0, check=_below_one),
    "mix": {
        "prob": F(0.0, "Probability that a training batch is mixed (CutMix "
                  "or MixUp, on device); 0 = off.", min=0.0, max=1.0),
        "cutmix_prob": F(0.4, "Probability that a mixed batch uses CutMix "
                         "(else MixUp).", min=0.0, max=1.0),
        "cutmix_alpha": F(1.0, "CutMix: Beta(alpha, alpha) of the kept area.",
                          min=1e-6),
        "mixup_alpha": F(0.2, "MixUp: Beta(alpha, alpha) of the mixing "
                         "weight.", min=1e-6),
    },
    # Model.
    "model": F("cifar_resnet20", "Registry name (models.list_models()) or "
               "the import path package.module:Class of a Flax model of "
               "your own.", check=_model_name),
    "model_args": F("", "Keyword arguments of the model as a JSON object, "
                    "e.g. '{\"stage_sizes\": [3, 4, 6, 3]}' ('' = none).",
                    check=_json_object),
    "width_factor": F(0, "Width factor f of the CIFAR torchvision-layout "
                      "ResNets (stages 8f..64f); 0 = the reference's rule: 2 "
                      "for cifar100, 1 otherwise.", min=0),
    "widths": F("", "Channel widths of a ResNet's stages, comma-separated "
                "(DSP's CIFAR ResNets: three, the first also the stem's; "
                "ResNet-20: 16,32,64); '' = the registry model's.",
                check=_widths),
    "dtype": F("float32", "Compute dtype of the inputs/activations.", DTYPES),
    "init_from": F("", "Pretrained start of every pipeline (local, never "
                   "downloaded): a torchvision state dict (ResNet, VGG-bn, "
                   "ViT, Swin), a timm ViT/Swin state dict, a reference "
                   ".pkl, a `python -m convert import` directory or a run's "
                   "stage directory; a head of another class count is "
                   "replaced ('' = none; DSP: same as dsp.init_from)."),
    # Plain training recipe (method='train').
    "epochs": F(164, "Training epochs of method='train'.", min=1),
    "max_steps": F(0, "Stop each stage after this many steps (0 = no cap; for "
                   "smoke tests). Schedules still span the full stage.", min=0),
    "optim": {
        "optimizer": F("sgd", "Optimizer.", OPTIMIZERS),
        "schedule": F("dsp_step", "Learning-rate schedule (training/optim.py)."
                      , SCHEDULES),
        "lr": F(0.1, "Base (peak) learning rate.", min=0.0),
        "momentum": F(0.9, "SGD momentum (max momentum for onecycle).",
                      min=0.0, max=1.0),
        "nesterov": F(False, "Nesterov momentum (SGD)."),
        "weight_decay": F(1e-4, "Weight decay: coupled (added to the gradient) "
                          "for SGD, decoupled for AdamW.", min=0.0),
        "wd_mask": F("all", "Decayed parameters: 'all', or 'weights' (conv/"
                     "dense kernels and norm scales, not biases).", WD_MASKS),
        "warmup_epochs": F(2, "dsp_step: epochs at lr * warmup_factor.", min=0),
        "warmup_factor": F(0.25, "dsp_step: lr factor of the warm-up epochs.",
                           min=0.0, max=1.0),
        "pct_start": F(0.3, "onecycle: fraction of steps increasing the lr.",
                       min=0.0, max=1.0),
        "div_factor": F(25.0, "onecycle: initial lr = lr / div_factor.",
                        min=1.0),
        "final_div_factor": F(1e4, "onecycle: final lr = initial lr / this.",
                              min=1.0),
        "base_momentum": F(0.85, "onecycle: lowest momentum of the cycle.",
                           min=0.0, max=1.0),
        "cycle_momentum": F(True, "onecycle: cycle momentum inversely to lr."),
        "warmup_fraction": F(0.1, "warmup_cosine: fraction of steps of linear "
                             "warm-up.", min=0.0, max=1.0),
        "b1": F(0.9, "AdamW beta1.", min=0.0, max=1.0),
        "b2": F(0.999, "AdamW beta2.", min=0.0, max=1.0),
        "eps": F(1e-8, "AdamW epsilon.", min=0.0),
    },
    # Checkpointing and watching.
    "checkpoint_every_steps": F(500, "Save a checkpoint every N steps (and at "
                                "the end of each stage).", min=1),
    "keep_checkpoints": F(2, "Periodic checkpoints kept (plus the best).",
                          min=1),
    "log_every_steps": F(50, "Write training metrics every N steps.", min=1),
    "eval_every_epochs": F(1, "Evaluate every N epochs (and at the end).",
                           min=1),
    "progress_bar": F(True, "Show progress per stage: a tqdm bar on a "
                      "terminal, one line per epoch otherwise."),
    # Multi-process jobs (training/mesh.py: initialize_distributed).
    "multihost": F(False, "Join a multi-process job, detecting the cluster "
                   "(TPU pod slice, SLURM, Open MPI); the three fields below "
                   "(or their JAX_* variables) join one without it."),
    "coordinator_address": F("", "host:port of process 0's coordinator ('' = "
                             "$JAX_COORDINATOR_ADDRESS, else detected)."),
    "num_processes": F(0, "Processes in the job (0 = $JAX_NUM_PROCESSES, else "
                       "detected).", min=0),
    "process_id": F(-1, "This process's index in [0, num_processes) (-1 = "
                    "$JAX_PROCESS_ID, else detected).", min=-1),
    "distributed_timeout": F(300, "Seconds to wait for every process to join "
                             "(and to detect a lost one).", min=1),
    # DSP (docs/concepts.md).
    "dsp": {
        "groups": F(4, "G: groups per taking-part conv (-g).", min=1),
        "regularize": F(2e-3, "λ: group-regulariser strength (-r).", min=0.0),
        "temperature": F(0.5, "τ: Gumbel-softmax temperature.", min=1e-6),
        "order": F(0.5, "q: order of the group-size quasi-norm.", min=1e-6),
        "prune_rate": F(0.2, "Target fraction of pruned FLOPs (P.FLOPS/100) of "
                        "the rate search (-p).", min=0.0, max=1.0),
        "cycles": F(5, "Fine-tuning cycles (each re-runs the rate search).",
                    min=1),
        "round_to": F(0, "Round each group's kept inputs and each fp "
                      "layer's kept filters UP to a multiple of this "
                      "(hardware-friendly widths, e.g. 8 or 16; never "
                      "prunes more than the threshold asks, and the rate "
                      "search prices the rounded prunes); 0 or 1 = off.",
                      min=0),
        "target_latency": F(0.0, "Prune to this predicted latency / dense "
                            "latency (e.g. 0.6) under the latency model "
                            "(section `latency`) instead of prune_rate; "
                            "0 = off (the FLOPs target).", min=0.0,
                            max=1.0, check=_below_one),
        "momentum": F(0.9, "SGD momentum of every DSP stage.", min=0.0,
                      max=1.0),
        "pretrain_epochs": F(164, "Pretraining epochs.", min=0),
        "pretrain_lr": F(0.1, "Pretraining lr (step schedule + warm-up).",
                         min=0.0),
        "pretrain_wd": F(1e-4, "Pretraining weight decay (coupled).",
                         min=0.0),
        "group_epochs": F(120, "Differentiable group learning epochs.",
                          min=1),
        "group_lr": F(0.05, "Group learning lr (cosine per epoch).", min=0.0),
        "group_wd": F(1e-3, "Group learning weight decay (coupled).",
                      min=0.0),
        "gate_lr": F(1e-3, "Adam lr of the group logits (betas 0.9, 0.999, eps "
                    "1e-12, as the reference).", min=0.0),
        "finetune_epochs": F(400, "Fine-tuning epochs in total (split evenly "
                             "over `cycles`).", min=1),
        "finetune_lr": F(0.015, "Fine-tuning lr (cosine per cycle).",
                         min=0.0),
        "finetune_wd": F(1e-3, "Fine-tuning weight decay (coupled).",
                         min=0.0),
        "fp_every": F(0, "n: a taking-part conv is an fp layer when "
                      "(index+1) % n == 0; 0 = derived from the structure "
                      "(the last conv of every residual block, every conv "
                      "without residual sums).", min=0),
        "fp_layers": F("", "Explicit fp layer indices among the taking-part "
                       "convs, comma-separated (override fp_every); "
                       "'' = none given.", check=_index_list),
        "second_order": F("parity", "Look-ahead group gradient: the "
                          "reference's formula or the exact jvp.",
                          ("parity", "exact")),
        "init_from": F("", "Input of the first selected stage instead of "
                       "the previous stage's output in the workdir: a run's "
                       "stage directory, a `python -m convert import` "
                       "directory, or a reference-format .pkl ('' = none)."),
    },
    # Latency model of latency targets (models/latency.py, docs/latency.md).
    "latency": {
        "batch": F(128, "Batch the latency target and prediction are for.",
                   min=1),
        "threads": F(1, "Torch threads of the measured latency table.",
                     min=1),
        "table": F("", "JSON cache of the measured per-layer table ('' = "
                   "latency_table.json in the workdir); one made on another "
                   "machine, torch version, thread count or batch is "
                   "re-measured."),
        "measured": F(True, "Measure the table with torch (cached); False = "
                      "the analytic fallback (the fast export's cost "
                      "model: MACs plus per-call overhead)."),
    },
    # DDROP (docs/concepts.md).
    "ddrop": {
        "prob": F((0.0, 0.95), "(min, max) KEEP probabilities of the least/"
                  "most important unit (--prob).", min=0.0, max=1.0,
                  length=2, check=_prob_pair),
        "schedule": F("constant", "Keep-range schedule (--schedule).",
                      ("constant", "cosine", "linear")),
        "total_steps": F(0, "Optimizer steps of the schedule progression "
                         "(0 = one third of the DDROP phase).", min=0),
        "epochs": F(200, "DDROP-phase epochs (--epochs).", min=1),
        "lr": F(0.1, "Peak lr of the DDROP and before phases (--lr).",
                min=0.0),
        "weight_decay": F(1e-4, "Weight decay on `weight` parameters "
                          "(--weight-decay).", min=0.0),
        "momentum": F(0.95, "SGD max momentum: the one-cycle schedule "
                      "cycles it to optim.base_momentum (0.85) and back, as "
                      "the original's OneCycleLR (overriding its SGD's 0.9).",
                      min=0.0, max=1.0),
        "optimizer": F("auto", "'auto': SGD + one-cycle for CNNs, AdamW + "
                       "warm-up cosine for transformers.",
                       ("auto", "sgd", "adamw")),
        "before_epochs": F(100, "Plain-training epochs before DDROP "
                           "(--before-epochs; 0 skips).", min=0),
        "amount": F(0.5, "Fraction of units pruned per DDROP layer "
                    "(--amount), in [0, 1).", min=0.0, max=1.0,
                    check=_below_one),
        "round_to": F(0, "Round each layer's kept unit count UP to a "
                      "multiple of this (e.g. 8 or 16; slightly fewer units "
                      "than `amount` are pruned); 0 or 1 = off.", min=0),
        "target_latency": F(0.0, "Choose `amount` (one for all layers) so "
                            "that the predicted latency is this fraction of "
                            "the dense one (section `latency`); 0 = "
                            "`amount` as given.", min=0.0, max=1.0,
                            check=_below_one),
        "ft_epochs": F(50, "Fine-tuning epochs (--ft-epochs).", min=0),
        "ft_lr": F(0.01, "Fine-tuning peak lr (--ft-lr).", min=0.0),
        "l1": F(1e-4, "λ_l1 of the L1 penalty on DDROP-layer scales.",
                min=0.0),
        "l1_rank_weighted": F(False, "Weight the L1 penalty by each unit's "
                              "drop probability."),
        "importance": F("norm", "Unit importance: |γ| (norms) / squared row "
                        "norm (linears), the producing filter's squared "
                        "norm, or the running mean of |activation|.",
                        ("norm", "weight_norm", "activation")),
        "prune_residual": F(False, "Also prune convs feeding a residual sum."),
        "dense_drop": F("linear", "Where a hidden Linear unit followed by a "
                        "LayerNorm (VGG-bn's CIFAR classifier) is dropped: "
                        "on the Linear's output (the reference) or on the "
                        "norm's, so a dropped unit is 0 as after pruning.",
                        ("linear", "norm")),
    },
}


def _walk(schema: Mapping[str, Any], prefix: str = ""):
  for key, value in schema.items():
    path = prefix + key
    if isinstance(value, Field):
      yield path, value
    else:
      yield from _walk(value, path + ".")


def fields() -> dict[str, Field]:
  """Every field by dotted path (``'optim.lr'``)."""
  return dict(_walk(SCHEMA))


def default_config() -> ml_collections.ConfigDict:
  """The ConfigDict with every field at its default (unlocked)."""

  def build(schema):
    return ml_collections.ConfigDict(
        {k: (v.default if isinstance(v, Field) else build(v))
         for k, v in schema.items()})

  return build(SCHEMA)


def _type_ok(default: Any, value: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, tuple):
    return isinstance(value, (tuple, list)) and all(
        _type_ok(default[0], v) for v in value)
  return isinstance(value, type(default))


def _check_field(path: str, f: Field, value: Any) -> str | None:
  if not _type_ok(f.default, value):
    return (f"{path}: expected {type(f.default).__name__}, got "
            f"{type(value).__name__} {value!r}")
  if f.choices is not None and value not in f.choices:
    return (f"{path}: invalid value {value!r}; valid choices: "
            f"{', '.join(map(str, f.choices))}")
  if f.length is not None and len(value) != f.length:
    return f"{path}: expected {f.length} values, got {len(value)}: {value!r}"
  for v in (value if isinstance(value, (tuple, list)) else (value,)):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      lo = -float("inf") if f.min is None else f.min
      hi = float("inf") if f.max is None else f.max
      if not lo <= v <= hi:
        return f"{path}: {value!r} is out of the valid range [{lo}, {hi}]"
  if f.check is not None:
    msg = f.check(value)
    if msg:
      return f"{path}: {msg}"
  return None


def _unknown(path: str, valid: list[str]) -> str:
  return (f"{path}: unknown field; valid fields here: "
          f"{', '.join(sorted(valid))}")


def validate(config: Mapping[str, Any]) -> None:
  """Checks every field of ``config`` against the schema.

  Args:
    config: a ConfigDict (or nested mapping) of a run.

  Raises:
    ConfigError: listing every unknown field and invalid value, each named by
      its dotted path, with the valid choices or range.
  """
  errors = []

  def walk(cfg, schema, prefix):
    for key in cfg.keys():
      path = prefix + key
      if key not in schema:
        errors.append(_unknown(path, list(schema)))
      elif isinstance(schema[key], Field):
        msg = _check_field(path, schema[key], cfg[key])
        if msg:
          errors.append(msg)
      elif not isinstance(cfg[key], Mapping) and not hasattr(cfg[key], "keys"):
        errors.append(f"{path}: expected a section with fields "
                      f"{', '.join(sorted(schema[key]))}")
      else:
        walk(cfg[key], schema[key], path + ".")
    for key in schema:
      if key not in cfg.keys():
        errors.append(f"{prefix + key}: missing field")

  walk(config, SCHEMA, "")
  if not errors:
    method = config["method"]
    if config["stages"] != "all":
      bad = [s.strip() for s in config["stages"].split(",")
             if s.strip() not in STAGES[method]]
      if bad:
        errors.append(f"stages: {bad} are not stages of method {method!r}; "
                      f"valid: all, {', '.join(STAGES[method])}")
    if config["eval_resize"] < config["image_size"]:
      errors.append(f"eval_resize: {config['eval_resize']} is smaller than "
                    f"image_size={config['image_size']} (the center crop)")
    if (config["select_on"] == "validation" and config["dataset"] != "digits"
        and config["validation_from_train"] == 0):
      errors.append("select_on: 'validation' needs validation_from_train > 0 "
                    f"(dataset {config['dataset']!r} has no validation split)")
  if errors:
    raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def check_override_paths(argv: list[str], flag: str = "config") -> None:
  """Rejects ``--config.PATH=VALUE`` overrides whose PATH is not a field.

  Run before the flag parser so that the error names the valid fields.

  Args:
    argv: command-line arguments.
    flag: name of the config flag.

  Raises:
    ConfigError: for the first unknown path.
  """
  known = fields()
  sections = {p.rsplit(".", 1)[0] for p in known if "." in p}
  for arg in argv:
    if not arg.startswith(f"--{flag}."):
      continue
    path = arg[len(flag) + 3:].split("=", 1)[0]
    if path in known:
      continue
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    if parent and parent not in sections:
      raise ConfigError(_unknown(path, sorted(
          p for p in known if "." not in p) + sorted(sections)))
    valid = [p.rsplit(".", 1)[-1] for p in known
             if (p.rsplit(".", 1)[0] if "." in p else "") == parent]
    raise ConfigError(_unknown(path, valid + (
        sorted(sections) if not parent else [])))


_TYPE_NAMES = {bool: "a boolean (true or false)", int: "an integer",
               float: "a number", tuple: "a tuple, e.g. (0.1, 0.9)",
               str: "a string"}


def check_override_values(argv: list[str], flag: str = "config") -> None:
  """Rejects ``--config.PATH=VALUE`` overrides whose VALUE does not parse as
  the field's type.

  Run before the flag parser, whose own error is a two-line ``FATAL Flags
  parsing error``; the parsers are the ones ``ml_collections`` applies, so
  what passes here parses there.

  Args:
    argv: command-line arguments.
    flag: name of the config flag.

  Raises:
    ConfigError: for the first value that does not parse, naming the field
      and the expected type.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections.config_flags import tuple_parser  # pylint: disable=g-import-not-at-top
  parsers = {bool: flags.BooleanParser(), int: flags.IntegerParser(),
             float: flags.FloatParser(), tuple: tuple_parser.TupleParser()}
  known = fields()
  for i, arg in enumerate(argv):
    if not arg.startswith(f"--{flag}."):
      continue
    path, eq, value = arg[len(flag) + 3:].partition("=")
    field = known.get(path)
    if field is None or type(field.default) not in parsers:
      continue  # Unknown paths: check_override_paths; strings: anything.
    kind = type(field.default)
    if not eq:
      if kind is bool or i + 1 >= len(argv):
        continue  # A bare boolean flag means True.
      value = argv[i + 1]
    try:
      parsers[kind].parse(value)
    except (ValueError, SyntaxError):
      raise ConfigError(f"--{flag}.{path}: expected {_TYPE_NAMES[kind]}, "
                        f"got {value!r}") from None


def selected_stages(config: Mapping[str, Any]) -> tuple[str, ...]:
  """The stages of ``config.method`` selected by ``config.stages``, in order."""
  all_stages = STAGES[config["method"]]
  if config["stages"] == "all":
    return all_stages
  chosen = {s.strip() for s in config["stages"].split(",")}
  return tuple(s for s in all_stages if s in chosen)


def to_dict(config: Any) -> dict[str, Any]:
  """A plain nested dict of a ConfigDict (tuples as lists)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=list))


def config_hash(config: Any, fields: Sequence[str] | None = None) -> str:
  """A short hash of the fields that change results.

  Args:
    config: the run config.
    fields: dotted paths or section names to hash (e.g. ``("model",
      "dataset", "dsp.pretrain_lr")``); default: every field but
      ``RUNTIME_FIELDS``.

  Returns:
    16 hex digits.
  """
  d = to_dict(config)
  if fields is None:
    for k in RUNTIME_FIELDS:
      d.pop(k, None)
  else:
    picked = {}
    for path in fields:
      value = d
      for part in path.split("."):
        value = value[part]
      picked[path] = value
    d = picked
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def describe() -> str:
  """Markdown table of every field: name, default, valid values, meaning."""
  rows = ["| field | default | valid | meaning |", "|---|---|---|---|"]
  for path, f in fields().items():
    if f.choices is not None:
      valid = ", ".join(f"`{c}`" for c in f.choices)
    elif f.min is not None or f.max is not None:
      valid = (f"[{'' if f.min is None else f.min}, "
               f"{'' if f.max is None else f.max}]")
    else:
      valid = ""
    doc = f.doc.replace("|", "\\|")
    rows.append(f"| `{path}` | `{f.default!r}` | {valid} | {doc} |")
  return "\n".join(rows)


def main() -> int:
  """``python -m training.config``: prints the table; returns 0."""
  print(describe())
  return 0


if __name__ == "__main__":
  from training import errors  # pylint: disable=g-import-not-at-top
  sys.exit(errors.quiet_pipe(main))
