"""Draws the pipeline diagrams of the README into docs/img/.

    python docs/make_figures.py [--out docs/img]

One PNG per method: its stages as boxes, left to right, each with the
config section that sets it and what it leaves behind. Re-run after a
change to the stages (training/config.py STAGES).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

# (stage name in config.stages, what it does, what it leaves)
DSP = [
    ("pretrain", "plain training\n(SGD, step schedule)", "dense network"),
    ("group", "group learning:\nGumbel-softmax groups,\ngroup lasso", "G groups per conv"),
    ("prune_finetune", "prune to the FLOPs\ntarget (β search),\ncyclic fine-tuning", "masks per group"),
    ("pack", "pack into branches,\nexport + check", "packed.pt, model.onnx"),
]
DDROP = [
    ("before", "plain training", "dense network"),
    ("ddrop", "train with units dropped\nby keep probability\n+ L1 on norm scales", "small |γ| on weak units"),
    ("prune", "prune floor(amount·C)\nunits per layer", "masks per unit"),
    ("finetune", "fine-tune,\nmasks held", "pruned network"),
    ("pack", "slim: remove units,\nexport + check", "slim.pt, model.onnx"),
]


def draw(stages, title: str, path: pathlib.Path) -> None:
  """One diagram: a box per stage, arrows between them."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # Files only: no display needed.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import FancyBboxPatch  # pylint: disable=g-import-not-at-top

  n = len(stages)
  box_w, gap = 2.3, 0.7
  fig, ax = plt.subplots(figsize=(0.95 * n * (box_w + gap), 2.7))
  for i, (name, what, leaves) in enumerate(stages):
    x = i * (box_w + gap)
    ax.add_patch(FancyBboxPatch((x, 0.0), box_w, 1.6,
                                boxstyle="round,pad=0.05,rounding_size=0.12",
                                facecolor=f"C{i}", alpha=0.18,
                                edgecolor=f"C{i}", lw=1.5))
    ax.text(x + box_w / 2, 1.38, name, ha="center", va="center",
            fontsize=11, family="monospace", weight="bold")
    ax.text(x + box_w / 2, 0.72, what, ha="center", va="center", fontsize=9)
    ax.text(x + box_w / 2, -0.3, "→ " + leaves, ha="center", va="center",
            fontsize=8, style="italic", color="0.3")
    if i < n - 1:
      ax.annotate("", xy=(x + box_w + gap - 0.08, 0.8),
                  xytext=(x + box_w + 0.08, 0.8),
                  arrowprops=dict(arrowstyle="-|>", lw=1.5, color="0.25"))
  ax.set_title(title, fontsize=12, loc="left")
  ax.set_xlim(-0.2, n * (box_w + gap) - gap + 0.2)
  ax.set_ylim(-0.6, 1.9)
  ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description="Draw the DSP and DDROP pipeline diagrams (PNG).")
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "img"),
                 help="output directory (default: docs/img)")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  draw(DSP, "DSP (method='dsp'): stages of config.stages", out / "dsp_pipeline.png")
  draw(DDROP, "DDROP (method='ddrop'): stages of config.stages",
       out / "ddrop_pipeline.png")
  for name in ("dsp_pipeline.png", "ddrop_pipeline.png"):
    print(f"wrote {out / name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
