"""The ImageNet data recipe (docs/data.md, ImageNet), and plain ResNet-50 training.

``recipe(config)`` sets the data fields every ImageNet run shares:
RandomResizedCrop 224 + horizontal flip + RandAugment (2 ops, magnitude 9) on
the host, evaluation resize 256 + center crop 224, CutMix (α = 1) or MixUp
(α = 0.2) chosen 0.4 / 0.6 on 90 % of the batches, no label smoothing. The
DDROP ImageNet configs and ``python -m ddrop_jax --dataset imagenet`` apply
it; ``get_config()`` is plain training of torchvision's ResNet-50 with it::

    python run.py --config configs/imagenet.py --config.data_dir=/data/imagenet

``dataset`` is ``imagenet2012`` (tfds's, prepared in array_record under
``data_dir``); set ``--config.dataset=imagefolder:/path/to/tree`` for a
``train/<class>/*.JPEG`` + ``val/<class>/*.JPEG`` tree instead.
"""

import ml_collections

from configs import base

# Host decode + augmentation worker processes per process: what one
# accelerator needs at ResNet-50's throughput (docs/data.md "ImageNet", measured by
# bench/input_pipeline.py); scale it with the accelerators of a process, as
# far as the host's cores go.
WORKERS = 10


def recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets the ImageNet data fields of ``config`` (in place) and returns it."""
  config.image_size = 224
  config.eval_resize = 256
  config.randaugment_ops = 2
  config.randaugment_magnitude = 9
  config.mix.prob = 0.9
  config.mix.cutmix_prob = 0.4
  config.mix.cutmix_alpha = 1.0
  config.mix.mixup_alpha = 0.2
  config.label_smoothing = 0.0
  config.worker_count = WORKERS
  return config


def get_config() -> ml_collections.ConfigDict:
  """Plain training of ResNet-50 on ImageNet with the recipe."""
  config = recipe(base.get_config())
  config.workdir = "runs/resnet50_imagenet"
  config.dataset = "imagenet2012"
  config.model = "resnet50"
  config.batch_size = 256
  config.epochs = 90
  config.optim.schedule = "warmup_cosine"
  config.optim.lr = 0.1
  return config
