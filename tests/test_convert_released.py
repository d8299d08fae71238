"""Import of the released DSP TorchScript checkpoints (needs ../shared)."""

from __future__ import annotations

import functools
import pathlib
import re

import numpy as np
import pytest
import torch

from convert import dsp, dsp_torch, packing, tables
from convert import writer
from training import artifacts

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
CKPTS = SHARED / "reference" / "dsp_checkpoints"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(
        not CKPTS.is_dir(),
        reason=f"released DSP checkpoints not found at {CKPTS} (the shared "
        "reference data lives beside the repository)"),
]


@functools.cache
def imported(name: str) -> dsp.ImportResult:
  return dsp.import_packed(CKPTS / f"{name}.pt", atol=None)


@pytest.mark.parametrize("name", ["resnet20_g2", "resnet20_g4", "resnet56_g3"])
def test_import_logits_equal_torchscript(name):
  r = imported(name)
  assert r.max_abs_diff <= 1e-4
  assert r.model_name == ("cifar_resnet56" if "56" in name else "cifar_resnet20")
  # Fresh random inputs, not the ones the import checked with.
  x = writer.random_images(3, seed=123)
  ts = torch.jit.load(str(CKPTS / f"{name}.pt"), map_location="cpu")
  got = artifacts.logits(r.model(), r.variables, x)
  assert np.abs(got - writer.torch_logits(ts, x)).max() <= 1e-4


def reference_pflops(variables, image_size: int = 32) -> float:
  """DSP's P.FLOPS written from its definition (taking-part convs only)."""
  params = variables["params"]
  total = left = 0.0
  size = image_size
  for s in (1, 2, 3):
    stage = params[f"stage_{s}"]
    for b in sorted(stage, key=int):
      stride = 2 if s > 1 and b == "0" else 1
      size //= stride
      for conv in ("conv_a", "conv_b"):
        w = np.asarray(stage[b][conv]["kernel"])          # HWIO
        k, _, i, o = w.shape
        surv = (np.abs(w).sum((0, 1)) > 0).sum()
        flops = o * i * k * k * size * size
        total += flops
        left += flops * surv / (o * i)
  return 100 * (1 - left / total)


def test_resnet20_g4_pruned_flops_match_released_table():
  r = imported("resnet20_g4")
  assert round(reference_pflops(r.variables), 2) == 63.57
  from models import flops  # pylint: disable=import-outside-toplevel
  rep = flops.report(r.model(), r.variables)
  assert round(rep.dsp_pflops, 2) == 63.57
  # The spec's whole-model figure for the same file (every conv and dense).
  assert round(rep.pflops_whole_model, 2) == 62.47


def _tree(m):
  return [(n, c.original_name) for n, c in m.named_modules()]


def _constants(m):
  out = {}
  for n, c in m.named_modules():
    if re.match(r"(Sampler|IAdd)_T\d+$", c.original_name):
      _, consts = c.code_with_constants
      out[n] = [v for _, v in sorted(consts.const_mapping.items())]
  return out


@pytest.mark.parametrize("name", [
    "resnet20_g2", "resnet20_g4",
    pytest.param("resnet56_g3", marks=pytest.mark.slow)])
def test_import_export_reproduces_file(tmp_path, name):
  r = imported(name)
  dsp.export_packed(r.model(), r.variables, tmp_path, program=False,
                    num_batches_tracked=r.num_batches_tracked)
  a = torch.jit.load(str(CKPTS / f"{name}.pt"), map_location="cpu")
  b = torch.jit.load(str(tmp_path / dsp.PACKED))
  assert _tree(a) == _tree(b)
  sa, sb = a.state_dict(), b.state_dict()
  assert list(sa) == list(sb)
  for k in sa:
    assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
  ca, cb = _constants(a), _constants(b)
  assert ca.keys() == cb.keys()
  for k in ca:
    assert len(ca[k]) == len(cb[k]) and all(
        x.dtype == y.dtype == torch.int64 and torch.equal(x, y)
        for x, y in zip(ca[k], cb[k])), k
  assert packing.plans_equal(dsp_torch.read_packed(a),
                             dsp_torch.read_packed(b)) == []


def test_released_branch_counts_and_bn_counters():
  r = imported("resnet20_g4")
  counts = dsp.branch_counts(r.plan)
  assert max(max(c) for c in counts.values()) == 4
  assert set(r.num_batches_tracked) == {"bn_1", "stage_2.0.downsample.1",
                                        "stage_3.0.downsample.1"}
  assert tables.num_batches_tracked(r.plan.stem)["bn_1"] > 0
