"""DDROP quickstart for transformers: a tiny ViT on the built-in digits data.

    python run.py --config configs/ddrop_vit_quickstart.py \\
        --workdir runs/ddrop_vit_quickstart

``vit_tiny`` (torchvision's ViT architecture: 8x8 patches of the 32x32
digits, 16 tokens + class token, 2 blocks of width 32 with 2 heads and 64
MLP hidden units, 24k parameters) with DDROP's per-unit scale after every
MLP's first Linear: 60 epochs of plain training, 30 of DDROP (keep range
reaching (0.0, 0.95) after a third of the phase on a cosine schedule, L1 on
the scales), half of each MLP's hidden units pruned, 10 epochs of
fine-tuning, then the slimmed PyTorch export (``workdir/export/slim.pt``,
``slim.pt2``, ``slim_state_dict.pt``: smaller ``mlp.0`` / ``mlp.3``).
Every phase uses AdamW with a linear warm-up over 10 % of its steps and a
cosine decay, weight decay on the ``weight`` parameters only (the
transformer recipe of docs/concepts.md (DDROP, phases)). CPU minutes.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The configuration."""
  config = base.get_config()
  config.method = "ddrop"
  config.workdir = "runs/ddrop_vit_quickstart"
  config.dataset = "digits"
  config.model = "vit_tiny"
  config.batch_size = 64
  config.test_batch_size = 360
  config.ddrop.optimizer = "auto"   # AdamW + warm-up cosine for a ViT
  config.ddrop.prob = (0.0, 0.95)
  config.ddrop.schedule = "cosine"
  config.ddrop.before_epochs = 60
  config.ddrop.epochs = 30
  config.ddrop.lr = 5e-3
  config.ddrop.weight_decay = 0.05
  config.ddrop.amount = 0.5
  config.ddrop.ft_epochs = 10
  config.ddrop.ft_lr = 2e-3
  config.checkpoint_every_steps = 200
  config.log_every_steps = 20
  config.eval_every_epochs = 10
  return config
