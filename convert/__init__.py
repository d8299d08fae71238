"""PyTorch interop (the only package that imports torch).

* ``convert.tables``    name tables and per-tensor layout functions (numpy);
* ``convert.reference`` the reference ``[state_dict, accuracy]`` files;
* ``convert.packing``   DSP packing as data (numpy);
* ``convert.dsp_torch`` the packed PyTorch modules, tracing, reading back;
* ``convert.dsp``       ``export_packed`` / ``import_packed``;
* ``convert.slim``      DDROP export: pruned ResNets/VGG-bns slimmed to
  ``convert.torch_zoo`` modules;
* ``convert.fast``      fast inference exports (``fast.pt``): a formulation
  chosen per layer, BN folded, memory format chosen; ``convert.fast_specs``
  describes packed and slimmed models for it, ``convert.fast_jax`` runs the
  same lowering in JAX;
* ``convert.jax_side``  Flax models/variables, the variables directory,
  random variables for checks and benchmarks;
* ``python -m convert`` ``import`` / ``export`` (packed for the DSP
  CifarResNet, slim for ResNet/VGG; ``--format``) / ``inspect``.

Submodules are imported on use, so ``import convert`` does not load torch.
"""
