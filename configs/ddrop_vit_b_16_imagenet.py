"""DDROP, torchvision ViT-B/16 on ImageNet from pretrained weights.

The reference tool's defaults.

    python run.py --config configs/ddrop_vit_b_16_imagenet.py \\
        --config.data_dir=/data/imagenet \\
        --config.init_from=/weights/vit_b_16.pth

``init_from`` is a local torchvision (``torchvision.models.vit_b_16``
weights) or timm state dict; nothing is downloaded. Every other field is at
the reference default (batch 128, 100 epochs of plain training, 200 of DDROP
on the constant schedule with keep range (0.0, 0.95), half of every MLP's
hidden units pruned, 50 epochs of fine-tuning, lr 0.1 / 0.01, weight decay
1e-4, seed 42) with the transformer optimizer of docs/concepts.md (DDROP, phases)
(``ddrop.optimizer='auto'``: AdamW, linear warm-up over 10 % of each
phase, cosine decay, weight decay on ``weight`` parameters only) and the
ImageNet data recipe of ``configs/imagenet.py``. The reference's learning
rates are its CNN defaults; for AdamW fine-tuning of pretrained weights set
smaller ones (``--config.ddrop.lr``, ``--config.ddrop.ft_lr``); this
recipe has not been run here (no ImageNet, no accelerator).
"""

import ml_collections

from configs import base
from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  """The configuration."""
  config = imagenet.recipe(base.get_config())
  config.method = "ddrop"
  config.workdir = "runs/ddrop_vit_b_16_imagenet"
  config.dataset = "imagenet2012"
  config.model = "vit_b_16"
  config.ddrop.optimizer = "auto"
  config.ddrop.prob = (0.0, 0.95)
  return config
