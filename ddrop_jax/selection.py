"""Which layers DDROP acts on, found by walking the params pytree by path.

A module is recognised from its parameters: a *conv* holds a 4-D ``kernel``,
a *dense* layer a 2-D ``kernel``, a *norm* (BatchNorm, LayerNorm) a 1-D
``scale`` and ``bias`` and no kernel. Paths are tuples of module names; joined
with '.' they are the PyTorch names (``stage_1.0.bn_a``, ``layer1.0.bn2``,
``features.1``, ``classifier.0``).

Rules, one per model family (spec section 2):

* **ResNet** (DSP's CifarResNet and the torchvision layout): a residual block
  is a non-root module holding two or more norms named ``bn<suffix>``
  (``bn1 bn2 [bn3]`` or ``bn_a bn_b``). DDROP acts on every one of them but
  the last in suffix order (BasicBlock: ``bn1`` / ``bn_a``; Bottleneck:
  ``bn1``, ``bn2``). The stem norm lives at the root and a shortcut norm is
  named ``downsample.1``, so neither is selected. The producer of
  ``bn<s>`` is the sibling conv ``conv<s>``.
* **VGG-bn**: every norm child of ``features`` (producer: the nearest conv
  before it in the same container) and every Linear child of ``classifier``
  except the last one, the output layer. A norm right after a hidden Linear
  (``classifier.1`` LayerNorm) is its *follower*: pruning zeros it with the
  unit. The unit is dropped on the Linear's output (``dense_drop='linear'``,
  the reference) or on the follower's (``'norm'``); its importance is the
  Linear's row norm either way.
* **ViT / Swin**: the per-unit scale ``mlp.dummy_norm`` (a 1-D ``scale``,
  ``models.transformer.DummyNorm``) after the first Linear of each MLP block,
  present when the model is built with ``mlp_scale=True``; its producer is
  the sibling ``fc1``. Attention layers are never selected.

Layers come out in natural path order (numeric components compared as
numbers), which does not depend on dict key order.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from models.layers import input_channels

Path = tuple[str, ...]

# kinds of DDROP layers
NORM = "norm"
DENSE = "dense"


@dataclasses.dataclass(frozen=True)
class DdropLayer:
  """One layer whose units DDROP drops (and pruning removes).

  Attributes:
    path: module whose output is multiplied by the Bernoulli draws: a norm, or
      for VGG's hidden classifier layers the Linear or its follower norm.
    kind: ``norm`` or ``dense`` (a hidden Linear's unit, ranked by its row).
    units: number of units C (channels or neurons).
    producer: conv/Linear whose output unit c feeds unit c (``path`` itself
      for a dense layer); its filter/row and bias are zeroed by pruning.
    norm: norm whose scale/bias entry c is zeroed by pruning: ``path`` for a
      norm layer, the follower norm (or None) for a dense layer.
  """

  path: Path
  kind: str
  units: int
  producer: Path | None
  norm: Path | None

  @property
  def name(self) -> str:
    """PyTorch-style dotted name."""
    return ".".join(self.path)


def _natural_key(path: Path) -> tuple:
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path)


def module_params(params: Mapping[str, Any]) -> dict[Path, dict[str, Any]]:
  """Flattens params to ``{module path: {leaf name: array}}``."""
  flat = traverse_util.flatten_dict(params)
  modules: dict[Path, dict[str, Any]] = {}
  for key, value in flat.items():
    modules.setdefault(tuple(key[:-1]), {})[key[-1]] = value
  return modules


def module_kind(leaves: Mapping[str, Any]) -> str | None:
  """``conv``, ``dense``, ``norm`` or None, from a module's parameters."""
  kernel = leaves.get("kernel")
  if kernel is not None:
    return {4: "conv", 2: "dense"}.get(len(kernel.shape))
  scale = leaves.get("scale")
  if scale is not None and len(scale.shape) == 1:
    return "norm"
  return None


def _children(modules: Mapping[Path, Any], parent: Path) -> dict[str, Path]:
  n = len(parent)
  return {p[n]: p for p in modules if len(p) == n + 1 and p[:n] == parent}


def _units(modules, path: Path) -> int:
  leaves = modules[path]
  leaf = leaves["kernel"] if "kernel" in leaves else leaves["scale"]
  return int(leaf.shape[-1])


_BN_NAME = re.compile(r"^bn(_?)([0-9]+|[a-z])$")


def _suffix_key(suffix: str) -> tuple:
  return (0, int(suffix), "") if suffix.isdigit() else (1, 0, suffix)


def norm_producer(modules, norm: Path) -> Path | None:
  """The conv/Linear feeding ``norm``, from sibling names; None if unknown.

  ``bn<s>`` is fed by ``conv<s>`` (or ``conv<s>_...``, as DSP's stem
  ``conv_1_3x3`` feeds ``bn_1``); a numbered norm ``i`` by the nearest conv or
  Linear numbered below ``i`` in the same container.
  """
  parent, name = norm[:-1], norm[-1]
  siblings = _children(modules, parent)
  kinds = {n: module_kind(modules[p]) for n, p in siblings.items()
           if p in modules}
  if name.isdigit():
    before = [int(n) for n, k in kinds.items()
              if n.isdigit() and int(n) < int(name) and k in ("conv", "dense")]
    return siblings[str(max(before))] if before else None
  m = _BN_NAME.match(name)
  if m is None:
    return None
  stem = "conv" + m.group(1) + m.group(2)
  for n in sorted(kinds):
    if kinds[n] == "conv" and (n == stem or n.startswith(stem + "_")):
      return siblings[n]
  return None


def _require_producer(modules, norm: Path) -> Path:
  producer = norm_producer(modules, norm)
  if producer is None:
    raise ValueError(f"DDROP layer {'.'.join(norm)}: cannot find the conv "
                     "that produces it (expected a sibling conv<suffix> or a "
                     "lower-numbered conv in the same container)")
  return producer


def _resnet_rule(modules) -> list[DdropLayer]:
  parents = {p[:-1] for p in modules if len(p) >= 2}
  found = []
  for parent in parents:
    bns = [(m.group(2), path) for n, path in _children(modules, parent).items()
           if (m := _BN_NAME.match(n)) and path in modules
           and module_kind(modules[path]) == "norm"]
    if len(bns) < 2:
      continue
    bns.sort(key=lambda sp: _suffix_key(sp[0]))
    for _, path in bns[:-1]:
      found.append(DdropLayer(path, NORM, _units(modules, path),
                              _require_producer(modules, path), path))
  return found


def _numbered(modules, container: Path) -> list[tuple[int, Path, str | None]]:
  out = []
  for n, path in _children(modules, container).items():
    if n.isdigit() and path in modules:
      out.append((int(n), path, module_kind(modules[path])))
  return sorted(out)


def _vgg_rule(modules) -> list[DdropLayer]:
  found = []
  for container in {p[:-1] for p in modules if len(p) >= 2}:
    if container[-1] == "features":
      for _, path, kind in _numbered(modules, container):
        if kind == "norm":
          found.append(DdropLayer(path, NORM, _units(modules, path),
                                  _require_producer(modules, path), path))
    elif container[-1] == "classifier":
      children = _numbered(modules, container)
      dense = [i for i, (_, _, k) in enumerate(children) if k == "dense"]
      for i in dense[:-1]:  # the last Linear is the output layer
        path = children[i][1]
        nxt = children[i + 1] if i + 1 < len(children) else None
        follower = nxt[1] if nxt is not None and nxt[2] == "norm" else None
        found.append(DdropLayer(path, DENSE, _units(modules, path), path,
                                follower))
  return found


def _transformer_rule(modules) -> list[DdropLayer]:
  found = []
  for path, leaves in modules.items():
    if path[-2:] != ("mlp", "dummy_norm") or module_kind(leaves) != "norm":
      continue
    fc1 = path[:-1] + ("fc1",)
    if fc1 not in modules or module_kind(modules[fc1]) != "dense":
      raise ValueError(f"DDROP layer {'.'.join(path)}: expected the MLP's "
                       f"first Linear {'.'.join(fc1)} beside it")
    found.append(DdropLayer(path, NORM, _units(modules, path), fc1, path))
  return found


# Each rule maps the module table to the DDROP layers of one family; a model
# matches the rules of every family whose structure it contains.
_RULES: tuple[Callable[[dict], list[DdropLayer]], ...] = (
    _resnet_rule, _vgg_rule, _transformer_rule)


def _as_params(model_or_params: Any, input_shape: tuple[int, ...] | None):
  if isinstance(model_or_params, nn.Module):
    model = model_or_params
    if input_shape is None:
      size = getattr(model, "image_size", None) or 32
      size = (size, size) if isinstance(size, int) else tuple(size)
      input_shape = (1, *size, input_channels(model))
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), x)
    return variables["params"]
  tree = model_or_params
  if isinstance(tree, Mapping) and "params" in tree:
    return tree["params"]
  return tree


def ddrop_layers(model_or_params: Any,
                 input_shape: tuple[int, ...] | None = None,
                 dense_drop: str = "linear") -> tuple[DdropLayer, ...]:
  """The DDROP layers of a model, in natural path order.

  Args:
    model_or_params: a Flax module (its parameter shapes are traced with
      ``jax.eval_shape``), a params pytree, or a variables dict with a
      ``params`` entry.
    input_shape: NHWC input shape for a module; default
      ``(1, image_size, image_size, in_channels)`` with the module's
      ``image_size`` (or 32) and ``in_channels`` (or 3).
    dense_drop: ``linear`` or ``norm``: where a hidden Linear's unit with a
      follower norm is dropped (``DdropConfig.dense_drop``).

  Returns:
    The layers (hashable, usable as static jit arguments).

  Raises:
    ValueError: no rule matches the model (name its structure in the error).
  """
  params = _as_params(model_or_params, input_shape)
  modules = module_params(params)
  found: dict[Path, DdropLayer] = {}
  for rule in _RULES:
    for layer in rule(modules):
      found.setdefault(layer.path, layer)
  if not found:
    tops = sorted({p[0] for p in modules if p})
    raise ValueError(
        "no DDROP layers found: expected residual blocks with norms bn1/bn2 "
        "(or bn_a/bn_b), VGG 'features'/'classifier' containers, or "
        "transformer MLPs with a dummy_norm (build ViT/Swin with "
        f"mlp_scale=True); the model has top-level modules {tops}")
  if dense_drop not in ("linear", "norm"):
    raise ValueError(f"dense_drop must be one of linear, norm; got "
                     f"{dense_drop!r}")
  if dense_drop == "norm":
    found = {k: dataclasses.replace(l, path=l.norm)
             if l.kind == DENSE and l.norm is not None else l
             for k, l in found.items()}
  return tuple(sorted(found.values(), key=lambda l: _natural_key(l.path)))


def prune_layers(params: Mapping[str, Any], layers: Iterable[DdropLayer],
                 scope: str = "ddrop_layers") -> tuple[DdropLayer, ...]:
  """The layers pruning acts on.

  Args:
    params: params pytree.
    layers: the DDROP layers.
    scope: ``ddrop_layers`` (only those) or ``all``: also every other norm
      whose producing conv is known from the names (stem, block-last and
      shortcut convs of a ResNet, which feed residual sums), as the reference
      code prunes them.

  Returns:
    The DDROP layers followed by the extra ones, in natural path order.
  """
  layers = tuple(layers)
  if scope == "ddrop_layers":
    return layers
  if scope != "all":
    raise ValueError(f"prune_scope must be one of ddrop_layers, all; got "
                     f"{scope!r}")
  modules = module_params(params)
  covered = {l.norm for l in layers} | {l.path for l in layers}
  extra = []
  for path, leaves in modules.items():
    if module_kind(leaves) != "norm" or path in covered:
      continue
    producer = norm_producer(modules, path)
    if producer is not None and module_kind(modules[producer]) == "conv":
      extra.append(DdropLayer(path, NORM, _units(modules, path), producer,
                              path))
  return layers + tuple(sorted(extra, key=lambda l: _natural_key(l.path)))
