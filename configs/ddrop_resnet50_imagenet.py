"""DDROP, torchvision ResNet-50 on ImageNet, with the reference tool's defaults.

    python run.py --config configs/ddrop_resnet50_imagenet.py \\
        --config.data_dir=/data/imagenet

is the same run as::

    python -m ddrop_jax --dataset imagenet --data-dir /data/imagenet \\
        --model resnet50 --prob 0.0 0.95

(every other flag at the reference default: batch 128, 100 epochs of plain
training, 200 of DDROP at lr 0.1 and weight decay 1e-4 on the constant
schedule, half the units of every DDROP layer pruned, 50 epochs of
fine-tuning at lr 0.01, seed 42) with the ImageNet data recipe of
``configs/imagenet.py``. ``dataset`` is ``imagenet2012`` (tfds's, prepared
in array_record under ``data_dir``); the command line falls back to an
image-folder tree at ``--data-dir``.
"""

import ml_collections

from configs import base
from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  """The configuration."""
  config = imagenet.recipe(base.get_config())
  config.method = "ddrop"
  config.workdir = "runs/ddrop_resnet50_imagenet"
  config.dataset = "imagenet2012"
  config.model = "resnet50"
  config.ddrop.prob = (0.0, 0.95)
  return config
