"""Encoded-image datasets: the image-folder builder, imagenet2012 reading,
bad layouts, corrupt files, loaders (resume with workers, process shards) and
a short DDROP run at 64x64."""

import io
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import imagenet_util
from training import data
from training import datasets
from training import transforms
from training.datasets import _base


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("tree")
  labels = imagenet_util.make_tree(root, train=4, val=2)
  data_dir = tmp_path_factory.mktemp("tfds")
  return root, labels, str(data_dir)


def _name(root):
  return f"imagefolder:{root}"


def _decoded(path):
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))


def test_builder_prepares_and_reads_back_exact(tree):
  root, labels, data_dir = tree
  name = _name(root)
  data.prepare(name, data_dir)
  info = data.get_info(name, data_dir, image_size=32)
  assert info.encoded and info.eval_split == "validation"
  assert info.num_classes == 3 and info.image_size == 32
  assert info.splits == {"train": 12, "validation": 6}
  builder = data._builder(name, data_dir)
  # The class index is the sorted folder names, saved with the data.
  assert builder.info.features["label"].names == sorted(
      imagenet_util.CLASSES)
  seen = {}
  for split in ("train", "validation"):
    raw = builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})
    src = data.source(name, split, data_dir)
    assert len(src) == len(raw)
    for i in range(len(src)):
      rel = raw[i]["file_name"].decode()
      record = src[i]
      # Stored as the file's encoded bytes, not re-encoded.
      assert record["image"] == (root / rel).read_bytes()
      assert record["label"] == labels[rel]
      np.testing.assert_array_equal(
          np.asarray(transforms.decode(record["image"], "pillow")),
          _decoded(root / rel))
      seen[rel] = record["label"]
  assert seen == labels


def test_imagenet2012_prepared_by_tfds_is_read_as_is(tmp_path):
  """A dataset laid out as tfds's imagenet2012 (same name, features and
  array_record files) is found under data_dir and read without its builder."""

  class _Imagenet2012(_base.LocalBuilder, skip_registration=True):
    name = datasets.IMAGENET2012
    VERSION = tfds.core.Version("5.1.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3),
                                           encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(num_classes=1000),
              "file_name": tfds.features.Text()}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(4),
              "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(n)
      for i in range(n):
        image = imagenet_util.smooth_image(rng, 30 + i, 40)
        yield i, {"image": imagenet_util.jpeg_bytes(image), "label": 7 * i,
                  "file_name": f"{i}.JPEG"}

  _Imagenet2012(data_dir=str(tmp_path), file_format="array_record"
                ).download_and_prepare()
  assert datasets.imagenet_dataset(tmp_path) == "imagenet2012"
  info = data.get_info("imagenet2012", str(tmp_path))
  assert info.num_classes == 1000 and info.encoded
  assert info.splits == {"train": 4, "validation": 2}
  src = data.source("imagenet2012", "validation", str(tmp_path))
  assert {src[i]["label"] for i in range(2)} == {0, 7}
  assert isinstance(src[0]["image"], bytes)
  batch = next(data.eval_batches("imagenet2012", "validation", str(tmp_path),
                                 batch_size=2,
                                 transform=transforms.EvalTransform(16, 18)))
  assert batch["image"].shape == (2, 16, 16, 3)


def test_imagenet_dataset_falls_back_to_folder_and_names_both(tmp_path):
  (tmp_path / "train").mkdir()
  assert datasets.imagenet_dataset(tmp_path) == f"imagefolder:{tmp_path}"
  with pytest.raises(datasets.LayoutError, match="imagenet2012.*train/"):
    datasets.imagenet_dataset(tmp_path / "nothing")


@pytest.mark.parametrize("breakage,message", [
    ("no_val", r"lacks .*/val"),
    ("no_train", r"lacks .*/train"),
    ("empty_class", r"empty class folder.*val/n01443537"),
    ("mismatch", r"class folders differ.*only in train: \['n01443537'\]"),
])
def test_bad_layouts_name_the_path(tmp_path, breakage, message):
  root = tmp_path / "tree"
  imagenet_util.make_tree(root, train=1, val=1)
  if breakage == "no_val":
    _rmtree(root / "val")
  elif breakage == "no_train":
    _rmtree(root / "train")
  elif breakage == "empty_class":
    for f in (root / "val" / "n01443537").iterdir():
      f.unlink()
  else:
    _rmtree(root / "val" / "n01443537")
  with pytest.raises(datasets.LayoutError, match=message):
    data.prepare(_name(root), str(tmp_path / "tfds"))


def _rmtree(path):
  for p in sorted(path.rglob("*"), reverse=True):
    p.unlink() if p.is_file() else p.rmdir()
  path.rmdir()


def test_corrupt_jpeg_is_skipped_and_counted_or_strict_error(tmp_path,
                                                             capsys):
  root = tmp_path / "tree"
  imagenet_util.make_tree(root, train=2, val=1)
  bad = root / "train" / "n01440764" / "n01440764_1.JPEG"
  bad.write_bytes(bad.read_bytes()[:200])  # Truncated mid-scan.
  with pytest.raises(datasets.CorruptImageError, match=str(bad)):
    data.prepare(_name(root), str(tmp_path / "strict"), strict=True)
  data.prepare(_name(root), str(tmp_path / "lenient"))
  assert "train: skipped 1 undecodable image(s)" in capsys.readouterr().err
  info = data.get_info(_name(root), str(tmp_path / "lenient"))
  assert info.splits == {"train": 5, "validation": 3}


def _loader(tree, **kwargs):
  root, _, data_dir = tree
  return data.train_loader(
      _name(root), "train", data_dir, global_batch_size=4, seed=3,
      transforms=[transforms.TrainTransform(16)], **kwargs)


def test_loader_resumes_bit_exact_with_two_workers(tree):
  it = iter(_loader(tree, worker_count=2, global_order=True))
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(_loader(tree, worker_count=2, global_order=True))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got["image"].shape == (4, 16, 16, 3)
    assert got["image"].dtype == np.uint8
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_per_process_shards_with_transforms_are_disjoint(tree):
  labels = []
  for p in range(2):
    batches = list(_loader(tree, process_index=p, process_count=2,
                           num_epochs=1, shuffle=False))
    assert len(batches) == 3 and batches[0]["image"].shape == (2, 16, 16, 3)
    labels.append(np.concatenate([b["label"] for b in batches]))
  # Shard p holds records [6p, 6p + 6) of the stored order.
  src = data.source(_name(tree[0]), "train", tree[2])
  stored = [src[i]["label"] for i in range(12)]
  np.testing.assert_array_equal(np.concatenate(labels), stored)


def test_encoded_datasets_need_transforms(tree):
  root, _, data_dir = tree
  with pytest.raises(ValueError, match="TrainTransform"):
    data.train_loader(_name(root), "train", data_dir, global_batch_size=4,
                      seed=0)
  with pytest.raises(ValueError, match="EvalTransform"):
    next(data.eval_batches(_name(root), "validation", data_dir,
                           batch_size=4))


def test_ddrop_command_line_runs_an_image_folder_at_64(tree, tmp_path):
  from ddrop_jax import cli
  root = tree[0]
  workdir = tmp_path / "run"
  argv = (f"--dataset imagenet --data-dir {root} --model cifar_resnet10_tiny "
          f"--prob 0.3 0.9 --before-epochs 0 --epochs 1 --ft-epochs 1 "
          f"--batch-size 4 --test-batch-size 6 --workdir {workdir} "
          "--config.image_size=64 --config.eval_resize=72 "
          "--config.worker_count=0 --config.max_steps=2 "
          "--config.progress_bar=False --config.stages=ddrop,prune,finetune "
          "--config.mix.prob=1.0").split()
  config = cli.parse(argv)
  assert config.dataset == f"imagefolder:{root}"
  assert (config.randaugment_ops, config.mix.cutmix_prob) == (2, 0.4)
  assert cli.main(argv) == 0
  report = json.loads((workdir / "report.json").read_text())
  assert [report["stages"][s]["steps"] for s in ("ddrop", "finetune")] == [
      2, 2]
  final = report["stages"]["finetune"]["final"]["test"]
  assert final["count"] == 6 and 0.0 <= final["accuracy"] <= 1.0
  lines = [json.loads(l) for l in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [l["loss"] for l in lines if "loss" in l]
  assert losses and all(np.isfinite(losses))


def test_imagenet_configs_follow_the_command_line(tmp_path):
  from configs import ddrop_resnet50_imagenet, ddrop_vgg16_imagenet, imagenet
  from ddrop_jax import cli
  from training import config as config_lib
  config_lib.validate(imagenet.get_config())
  (tmp_path / "train").mkdir()
  for module, model in ((ddrop_resnet50_imagenet, "resnet50"),
                        (ddrop_vgg16_imagenet, "vgg16_bn")):
    want = module.get_config()
    config_lib.validate(want)
    got = cli.parse(f"--dataset imagenet --data-dir {tmp_path} --model "
                    f"{model} --prob 0.0 0.95".split())
    assert got.dataset == f"imagefolder:{tmp_path}"
    for c in (got, want):
      c.dataset = c.data_dir = c.workdir = ""
    assert config_lib.to_dict(got) == config_lib.to_dict(want)
  with pytest.raises(cli.UsageError, match="--data-dir: no ImageNet data"):
    cli.parse(f"--dataset imagenet --data-dir {tmp_path}/none --model "
              "resnet50 --prob 0 1".split())


def test_config_checks_eval_resize_and_dataset_names():
  from configs import base
  from training import config as config_lib
  config = base.get_config()
  config.dataset = "imagefolder:/data/tree"
  config.image_size, config.eval_resize = 128, 112
  with pytest.raises(config_lib.ConfigError, match="eval_resize: 112 is "
                     "smaller than image_size=128"):
    config_lib.validate(config)
  config.eval_resize = 146
  config_lib.validate(config)
  config.dataset = "imagefolder:"
  with pytest.raises(config_lib.ConfigError, match="imagefolder:<path>"):
    config_lib.validate(config)
