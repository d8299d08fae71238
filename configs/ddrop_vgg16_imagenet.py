"""DDROP, torchvision VGG-16-bn on ImageNet, with the reference tool's defaults.

    python run.py --config configs/ddrop_vgg16_imagenet.py \\
        --config.data_dir=/data/imagenet

is the same run as::

    python -m ddrop_jax --dataset imagenet --data-dir /data/imagenet \\
        --model vgg16_bn --prob 0.0 0.95

The recipe of ``configs/ddrop_resnet50_imagenet.py`` (its docstring lists
every setting) with the model swapped.
"""

import ml_collections

from configs import ddrop_resnet50_imagenet


def get_config() -> ml_collections.ConfigDict:
  """The configuration."""
  config = ddrop_resnet50_imagenet.get_config()
  config.workdir = "runs/ddrop_vgg16_bn_imagenet"
  config.model = "vgg16_bn"
  return config
