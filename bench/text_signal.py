"""How much does one caption word change a frozen image UNet's features? (issue 10: why direction is not learned)

The motion modules of an inflated UNet (AnimateDiff style) never see the caption: text reaches the video
model only through the image model's spatial cross-attention. If the image model was trained on captions whose
direction words never mattered for a single frame, its cross-attention output barely moves when "left"
becomes "right", and motion modules trained on top of frozen spatial layers have almost nothing to read the
prompted direction from. This bench measures that: for a base caption and captions that change one
attribute word, the relative change ``||h(c') - h(c)|| / ||h(c)||`` of the hidden states after every
cross-attention block, on the same noisy input, at several timesteps.

    PYTHONPATH=. .venv/bin/python bench/text_signal.py [--model pipelines/assets/tiny-image-16px]

Prints one line per timestep and a JSON summary (the mean over blocks and timesteps, per changed word).

With ``--data DIR`` (a preprocessed folder with labels, such as ``demo/out/data``) it also checks that the
text encoder itself carries the labels: a linear probe (softmax regression, seed 0) on the masked-mean token
states of the train clips' captions, scored on the val clips' captions, per label, and the spread of the
per-class means relative to the states' norm.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import numpy as np
import torch

BASE = "a red circle moves to the left"
SWAPS = {
    "direction (left -> right)": "a red circle moves to the right",
    "direction (left -> up)": "a red circle moves up",
    "colour (red -> blue)": "a blue circle moves to the left",
    "shape (circle -> square)": "a red square moves to the left",
}


def main(argv: list[str] | None = None) -> dict:
    from pyoco.model import load_unet2d
    from pyoco.text import load_text_encoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pipelines/assets/tiny-image-16px", help="An image UNet folder.")
    ap.add_argument("--timesteps", default="999,700,400,100")
    ap.add_argument("--seeds", type=int, default=8, help="Noisy inputs averaged over.")
    ap.add_argument("--data", help="Preprocessed clips with labels: also probe the caption states per label.")
    args = ap.parse_args(argv)

    unet = load_unet2d(args.model).eval()
    size = int(unet.config.sample_size)
    text = load_text_encoder({"kind": "minilm", "max_length": 32})
    captions = [BASE, *SWAPS.values()]
    cond, _ = text.encode(captions)
    cond = torch.as_tensor(cond).float()
    feats: dict[str, torch.Tensor] = {}
    blocks = [(f"down{i}", b) for i, b in enumerate(unet.down_blocks) if hasattr(b, "attentions")]
    blocks += [("mid", unet.mid_block)]
    blocks += [(f"up{i}", b) for i, b in enumerate(unet.up_blocks) if hasattr(b, "attentions")]
    for name, block in blocks:
        block.register_forward_hook(
            lambda m, i, o, name=name: feats.__setitem__(name, o[0] if isinstance(o, tuple) else o)
        )
    rows = {label: [] for label in SWAPS}
    for t in (int(x) for x in args.timesteps.split(",")):
        per_t = {label: [] for label in SWAPS}
        for seed in range(args.seeds):
            x = torch.randn(
                1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed)
            )
            with torch.no_grad():
                unet(
                    x.expand(len(captions), -1, -1, -1),
                    torch.full((len(captions),), t),
                    encoder_hidden_states=cond,
                )
            for j, label in enumerate(SWAPS, start=1):
                per_t[label] += [float((h[j] - h[0]).norm() / h[0].norm()) for h in feats.values()]
        print(f"t={t:4d}: " + "; ".join(f"{k} {np.mean(v):.4f}" for k, v in per_t.items()))
        for k, v in per_t.items():
            rows[k] += v
    summary = {
        "model": args.model,
        "relative_feature_change": {k: round(float(np.mean(v)), 4) for k, v in rows.items()},
        "blocks": [n for n, _ in blocks],
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "reproduce": "PYTHONPATH=. .venv/bin/python bench/text_signal.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.data:
        summary["caption_probe"] = caption_probe(args.data)
    print(json.dumps(summary))
    return summary


def caption_probe(data: str, labels: tuple[str, ...] = ("direction", "color", "shape", "speed")) -> dict:
    """Per label: val accuracy of a linear probe trained on the train captions' masked-mean token states,
    and the mean distance of the class means from their centre over the mean state norm."""
    from pyoco import clips as C

    def pooled(split: str):
        table = C.read_clips(data, split).sort_by("clip_id")
        cond, mask = C.embedding_arrays(table)
        x = (cond * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return torch.tensor(x, dtype=torch.float32), [
            json.loads(s) for s in table.column("labels").to_pylist()
        ]

    (x_tr, l_tr), (x_va, l_va) = pooled("train"), pooled("val")
    out = {}
    for key in labels:
        names = sorted({str(lab.get(key)) for lab in l_tr})
        y_tr = torch.tensor([names.index(str(lab.get(key))) for lab in l_tr])
        keep = [i for i, lab in enumerate(l_va) if str(lab.get(key)) in names]
        y_va = torch.tensor([names.index(str(l_va[i].get(key))) for i in keep])
        torch.manual_seed(0)
        probe = torch.nn.Linear(x_tr.shape[1], len(names))
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(500):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(x_tr), y_tr).backward()
            opt.step()
        with torch.no_grad():
            acc = float((probe(x_va[keep]).argmax(1) == y_va).float().mean())
        means = torch.stack([x_tr[y_tr == i].mean(0) for i in range(len(names))])
        spread = float((means - means.mean(0)).norm(dim=1).mean() / x_tr.norm(dim=1).mean())
        out[key] = {
            "classes": len(names),
            "val_accuracy": round(acc, 3),
            "class_mean_spread": round(spread, 3),
        }
        print(
            f"caption probe {key}: {len(names)} classes, val accuracy {acc:.3f}, class-mean spread {spread:.3f}"
        )
    return out


if __name__ == "__main__":
    main()
