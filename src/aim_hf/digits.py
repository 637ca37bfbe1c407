"""scikit-learn's handwritten digits as an image dataset, and the classifier that scores generated digits.

The Hub weights cannot be fetched offline, so the package's default model is trained on data that
ships with a registry package: the 1,797 8x8 digits of scikit-learn, upscaled to a size a VQ
tokenizer can work with. The same digits train a small classifier whose predictions and hidden
features measure generated samples (class consistency and a Frechet distance). Needs the
``train``/``eval`` extras (datasets, scikit-learn, scipy).
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier
from torch import Tensor

__all__ = ["DigitClassifier", "digits_tensors", "frechet_distance", "load_digits_dataset"]

DIGIT_SIDE = 8  # scikit-learn's digits are 8x8
MAX_INTENSITY = 16  # with ink intensities 0..16


def load_digits_dataset(size: int = 32) -> Dataset:
    """The 1,797 digits as RGB images of size x size (white digit on black, bicubic upscaling) with
    a ClassLabel "label" named "0".."9"; deterministic, in scikit-learn's order."""
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / MAX_INTENSITY)).astype(np.uint8)
    images = [
        Image.fromarray(p)  # uint8 (8, 8): mode "L"
        .resize((size, size), Image.Resampling.BICUBIC)
        .convert("RGB")
        for p in pixels
    ]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    return Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def digits_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Images (N, C, H, W) float in [0, 1] and labels (N,) of a dataset of equal-size images."""
    columns = dataset.with_format("torch")[:]  # datasets' torch format gives images as (C, H, W) uint8
    return columns["image"].float() / 255, columns["label"].long()


class DigitClassifier:
    """An MLP on the 8x8 grayscale content of digit images (any size, RGB or gray, in [0, 1]).

    Generated images are reduced to 8x8 by area averaging, the resolution the real digits carry
    information at, so the score judges the digit rather than upscaling details. The hidden
    ReLU layer is the feature space of the Frechet distance. Training takes about a second.
    """

    def __init__(self, hidden_size: int = 64, seed: int = 0) -> None:
        self.mlp = MLPClassifier((hidden_size,), alpha=1e-2, max_iter=1000, random_state=seed)

    @staticmethod
    def _inputs(images: Tensor) -> np.ndarray:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor (B, C, H, W) in [0, 1], got {tuple(images.shape)}"
            )
        gray = images.detach().cpu().double().mean(dim=1, keepdim=True)
        return F.adaptive_avg_pool2d(gray, DIGIT_SIDE).flatten(1).numpy()

    def fit(self, images: Tensor, labels: Tensor) -> DigitClassifier:
        """Train on real digits (deterministic for a given seed); returns self."""
        self.mlp.fit(self._inputs(images), labels.cpu().numpy())
        return self

    def predict(self, images: Tensor) -> np.ndarray:
        """The predicted digit of each image, shape (B,)."""
        return self.mlp.predict(self._inputs(images))

    def features(self, images: Tensor) -> np.ndarray:
        """Hidden-layer activations, shape (B, hidden_size), float64."""
        weight, bias = self.mlp.coefs_[0], self.mlp.intercepts_[0]
        return np.maximum(self._inputs(images) @ weight + bias, 0.0)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), in float64.

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The last trace is computed as
    tr((R S_b R)^(1/2)) with R = S_a^(1/2): that matrix is symmetric PSD and similar to S_a S_b, so
    both square roots come from symmetric eigendecompositions (backward stable, real) instead of
    sqrtm of a non-symmetric product, which can return complex parts and needs an eps offset on
    the rank-deficient covariances that dead ReLU units give. Rounding leaves eigenvalues of
    order +-1e-16 * max: negative ones are clipped to zero, and as the square root amplifies
    them to about 1e-8 * sqrt(max), the result is exact to about D * 1e-8 * sqrt(max) and
    clipped at zero, which a distance cannot go below.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets (N >= 2, D) of equal D, got {a.shape} and {b.shape}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = np.sqrt(np.clip(cross, 0.0, None)).sum()
    diff = mean_a - mean_b
    return max(0.0, float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_cross))
