"""The traced graph: the one description of a network.

``analyze(model, image_size, channels)`` traces any Flax Linen model and
returns a ``Graph``: layers in call order with shapes and MACs, channel
couplings (residual spaces, depthwise convs, concatenations, norms and
per-channel variables following their channels), roles (stem, residual
blocks, shortcuts, DSP's taking-part layers) and the channel program that
liveness (``dead_channels``) and DSP's dead-structure removal evaluate.
Every method, FLOPs count and exporter reads it.
"""

from models.graph.core import (BATCH, CHANNELS, MIXES, NONE, READS_ALL,
                               UNKNOWN, Block, Graph,
                               LayerInfo, accepts_train, analyze, apply_fn,
                               check_followed, hashable, train_kwargs)
from models.graph.cut import (Branch, Cut, LayerCut, cut, kept_of,
                              space_channels)
from models.graph.liveness import (Evaluation, connectivity, dead_channels,
                                   evaluate, norm_alive, zero_dead)

__all__ = [
    "BATCH", "Block", "Branch", "CHANNELS", "Cut", "Evaluation", "Graph",
    "LayerCut", "LayerInfo", "MIXES", "NONE", "READS_ALL", "UNKNOWN",
    "accepts_train", "analyze", "apply_fn", "check_followed", "connectivity",
    "cut", "dead_channels", "evaluate", "hashable", "kept_of", "norm_alive",
    "space_channels", "train_kwargs", "zero_dead",
]
