"""DSP on Fashion-MNIST: the whole pipeline in under an hour on 2 CPU cores.

    python run.py --config configs/dsp_fashion_mnist.py \\
        --workdir runs/dsp_fashion_mnist

The four official IDX files are read from ``/usr/share/datasets/fashion-mnist``
(``apt-get install dataset-fashion-mnist``) or ``--config.data_dir`` and
prepared once (28x28x1, 60,000 / 10,000 images).

Network: the half-width ResNet-20 (stages of 8, 16 and 32 channels, 68 k
parameters, 7.8 M MACs per image): at 28x28 it trains at about 500 img/s on
2 CPU cores, 2.2 times the full-width ResNet-20 (16, 32, 64), so a dense
network above 92 % and the whole DSP pipeline fit in the hour.

Recipe: 5,000 training images held out as the validation split, which
selects the exported checkpoint (the test split is only reported);
pretraining 8 epochs (DSP's recipe: lr 0.1, step schedule with warm-up);
group learning 3 epochs with G = 4 and λ = 1e-2 (the short-phase strength of
``configs/quickstart.py``); pruning to 50 % P.FLOPS in 2 fine-tuning cycles
of 3 epochs; the packed PyTorch export. docs/benchmarks.md
(Fashion-MNIST) gives the measured accuracies.
"""

import ml_collections

from configs import base

# The half-width ResNet-20 of this recipe and of the Fashion-MNIST study.
WIDTHS = "8,16,32"
# Training images held out for model selection.
VALIDATION = 5_000


def data_config(config: ml_collections.ConfigDict) -> None:
  """The data, network and evaluation fields both Fashion-MNIST recipes use."""
  config.dataset = "fashion_mnist"
  config.model = "cifar_resnet20"
  config.widths = WIDTHS
  config.batch_size = 128
  config.test_batch_size = 500
  config.validation_from_train = VALIDATION
  config.select_on = "validation"
  config.checkpoint_every_steps = 200
  config.log_every_steps = 43
  config.eval_every_epochs = 2


def get_config() -> ml_collections.ConfigDict:
  """The DSP Fashion-MNIST configuration."""
  config = base.get_config()
  config.method = "dsp"
  config.workdir = "runs/dsp_fashion_mnist"
  data_config(config)
  config.dsp.groups = 4
  config.dsp.regularize = 1e-2
  config.dsp.prune_rate = 0.5
  config.dsp.pretrain_epochs = 8
  config.dsp.group_epochs = 3
  config.dsp.cycles = 2
  config.dsp.finetune_epochs = 6
  return config
