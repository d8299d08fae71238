"""Quickstart: the whole DSP pipeline on the built-in digits data, CPU minutes.

    python run.py --config configs/quickstart.py --workdir runs/quickstart

CIFAR ResNet-20 with G=4 groups on the 1257 training digits (batch 64, 19
steps per epoch): pretraining 20 epochs (lr 0.1, step schedule with warm-up),
group learning 10 epochs (λ=1e-2: the short phase needs a stronger
regulariser than CIFAR's 2e-3 to shape the groups), rate search to 55 %
pruned FLOPs (reference measure) and 5 fine-tuning cycles of 6 epochs, then
the packed TorchScript export in ``runs/quickstart/export/``. The other
fields are the reference recipe's (docs/concepts.md, DSP).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The quickstart configuration."""
  config = base.get_config()
  config.method = "dsp"
  config.workdir = "runs/quickstart"
  config.dataset = "digits"
  config.model = "cifar_resnet20"
  config.batch_size = 64
  config.test_batch_size = 200
  config.dsp.groups = 4
  config.dsp.regularize = 1e-2
  config.dsp.prune_rate = 0.55
  config.dsp.pretrain_epochs = 20
  config.dsp.group_epochs = 10
  config.dsp.cycles = 5
  config.dsp.finetune_epochs = 30
  config.checkpoint_every_steps = 200
  config.log_every_steps = 19
  config.eval_every_epochs = 2
  return config
