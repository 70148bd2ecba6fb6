"""Train the small CNN that ships with graphq on scikit-learn's handwritten digits.

Writes, beside this file:

- ``digits_cnn.onnx``: the float model, exported with its BatchNormalization layers kept
  (input ``image`` float32 [N, 1, 8, 8] scaled to 0..1, output ``logits`` [N, 10]);
- ``calib.npz``: ``image`` of 256 training samples, for calibration;
- ``test.npz``: ``image`` and ``label`` of the 360 held-out samples, for evaluation.

Needs torch and scikit-learn (``pip install torch==2.13.0 scikit-learn``). Deterministic:
the same versions give the same files.

    python examples/digits/train.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8], 0..1
    return train_test_split(images, digits.target.astype(np.int64), test_size=360,
                            random_state=0, stratify=digits.target)


def build():
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        """Conv-BN-ReLU blocks, a depthwise-separable block, global pooling, a linear head."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return DigitsCNN()


def train(model, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def export(model, path: Path) -> None:
    import torch

    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=13, dynamo=False, do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = load_digits()
    model = build()
    train(model, x_train, y_train, args.epochs)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"test accuracy {accuracy:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out / "digits_cnn.onnx")
    np.savez_compressed(args.out / "calib.npz", image=x_train[:256])
    np.savez_compressed(args.out / "test.npz", image=x_test, label=y_test)
    print(f"wrote {args.out / 'digits_cnn.onnx'}, calib.npz, test.npz")


if __name__ == "__main__":
    main()
