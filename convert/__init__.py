"""PyTorch interop (the only package that imports torch).

* ``convert.tables``    name tables and per-tensor layout functions (numpy);
* ``convert.reference`` the reference ``[state_dict, accuracy]`` files;
* ``convert.packing``   DSP packing as data (numpy);
* ``convert.dsp_torch`` the packed PyTorch modules, tracing, reading back;
* ``convert.dsp``       ``export_packed`` / ``import_packed``;
* ``convert.jax_side``  Flax models/variables and the variables directory;
* ``python -m convert`` ``import`` / ``export`` / ``inspect``.

Submodules are imported on use, so ``import convert`` does not load torch.
"""
