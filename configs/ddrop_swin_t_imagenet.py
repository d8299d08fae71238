"""DDROP, torchvision Swin-T on ImageNet from pretrained weights.

The reference tool's defaults.

    python run.py --config configs/ddrop_swin_t_imagenet.py \\
        --config.data_dir=/data/imagenet \\
        --config.init_from=/weights/swin_t.pth

The recipe of ``configs/ddrop_vit_b_16_imagenet.py`` (its docstring lists
every setting and caveat) with the model swapped; ``init_from`` is a local
torchvision (``torchvision.models.swin_t`` weights) or timm state dict.
"""

import ml_collections

from configs import ddrop_vit_b_16_imagenet


def get_config() -> ml_collections.ConfigDict:
  """The configuration."""
  config = ddrop_vit_b_16_imagenet.get_config()
  config.workdir = "runs/ddrop_swin_t_imagenet"
  config.model = "swin_t"
  return config
