"""DSP on ImageNet: torchvision ResNet-50 / ResNet-18 (G = 2), pretrained start.

From a local pretrained state dict.

    python run.py --config configs/dsp_imagenet.py:resnet50_p70 \\
        --config.data_dir=/data/imagenet \\
        --config.dsp.init_from=/weights/resnet50-0676ba61.pth

Variants ``resnet50_p70``, ``resnet50_p80``, ``resnet50_p90`` (G = 2) are the
DSP authors' ImageNet ResNet-50 points at 70 / 80 / 90 % FLOPs reduction
(their README reports 76.54 / 75.45 / 73.29 % top-1 for them);
``resnet18_p{50,60,70}`` run ResNet-18 the same way (G = 2). ``dsp.init_from``
must name a pretrained checkpoint: a torchvision state dict (``.pth``), a
run's stage directory or a ``python -m convert import`` directory; the
pretraining stage is skipped (``dsp.pretrain_epochs = 0``).

What is derived, not set: the taking-part convs (every conv but the stem and
the downsample convs), the fp layers (``conv3`` of every bottleneck,
``conv2`` of every basic block) and the FLOPs probe (224 x 224).

The ImageNet schedule of group learning and fine-tuning is not in the
reference code (its TODO lists the model-agnostic pruner); the epochs and
learning rates below are this project's choice for a pretrained start (group
learning 30 epochs at lr 0.01, fine-tuning 3 cycles of 30 epochs at lr 0.01,
batch 256, the ImageNet data recipe of ``configs/imagenet.py`` without
CutMix / MixUp), untested at full scale. ``dsp.prune_rate`` targets the reference P.FLOPS measure (taking-
part convs) less the 0.1 pt each re-prune adds; the report gives the
whole-model figure beside it.
"""

import ml_collections

from configs import base
from configs import imagenet

# (model, FLOPs reduction in %) of each variant.
VARIANTS = {
    "resnet50_p70": ("resnet50", 70), "resnet50_p80": ("resnet50", 80),
    "resnet50_p90": ("resnet50", 90), "resnet18_p50": ("resnet18", 50),
    "resnet18_p60": ("resnet18", 60), "resnet18_p70": ("resnet18", 70),
}
CYCLES = 3
# Each re-prune between cycles adds 0.1 pt to the target.
REPRUNE_DRIFT = 0.1 * (CYCLES - 1)


def get_config(arg: str = "resnet50_p70") -> ml_collections.ConfigDict:
  """The variant ``arg`` (see ``VARIANTS``)."""
  if arg not in VARIANTS:
    raise ValueError(f"no DSP ImageNet variant {arg!r}; valid: "
                     f"{', '.join(VARIANTS)}")
  model, reduction = VARIANTS[arg]
  config = imagenet.recipe(base.get_config())
  config.method = "dsp"
  config.workdir = f"runs/dsp_imagenet_{arg}"
  config.dataset = "imagenet2012"
  config.model = model
  config.batch_size = 256
  config.test_batch_size = 250
  # DSP's group-learning step takes integer labels: no CutMix / MixUp.
  config.mix.prob = 0.0
  config.dsp.groups = 2
  config.dsp.regularize = 2e-3
  config.dsp.prune_rate = round((reduction - REPRUNE_DRIFT) / 100.0, 4)
  config.dsp.pretrain_epochs = 0
  config.dsp.group_epochs = 30
  config.dsp.group_lr = 0.01
  config.dsp.group_wd = 1e-4
  config.dsp.cycles = CYCLES
  config.dsp.finetune_epochs = 30 * CYCLES
  config.dsp.finetune_lr = 0.01
  config.dsp.finetune_wd = 1e-4
  return config
