"""Real weights on real data: the bundled EfficientNet-Lite0 on a Fashion-MNIST subset."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import featx
from featx.data import open_dataset
from featx.data.sources import fashion_mnist_dirs

pytestmark = pytest.mark.slow


def _have_fashion_mnist() -> bool:
    return any((d / "train-images-idx3-ubyte.gz").exists() for d in fashion_mnist_dirs(None))


needs_fmnist = pytest.mark.skipif(
    not _have_fashion_mnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)


def _linear_accuracy(entry, layer: str) -> float:
    f = entry.load(layer)
    train, test = f.split == "train", f.split == "test"
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
    return clf.fit(f.X[train], f.y[train]).score(f.X[test], f.y[test])


def _balanced_subset(per_class: dict[str, int], seed: int = 0):
    """``per_class[split]`` images of each class from each split. A larger test share than ``--limit``'s
    1 in 7: the accuracies compared below differ by about a tenth, and a subset this small would
    otherwise measure them on too few test images to tell reliably."""
    source = open_dataset("fashion-mnist")
    splits, labels = np.asarray(source.splits), np.asarray(source.labels)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero((splits == split) & (labels == label)), n, replace=False)
              for split, n in per_class.items() for label in np.unique(labels)]
    return source.subset(np.sort(np.concatenate(chosen)))


@needs_fmnist
def test_pretrained_features_are_far_more_separable_than_random_init():
    """Proof that the weights are really loaded: ImageNet features beat the same net untrained."""
    subset = _balanced_subset({"train": 100, "test": 50})  # 1,500 images
    options = dict(image_size=64, progress=False)
    pretrained = featx.extract(subset, **options)
    random_init = featx.extract(subset, weights="none", **options)
    assert pretrained.key != random_init.key
    acc = {w: {layer: _linear_accuracy(e, layer) for layer in e.layer_names}
           for w, e in (("pretrained", pretrained), ("none", random_init))}
    assert acc["pretrained"]["pre_logits"] >= acc["none"]["pre_logits"] + 0.10, acc
    assert max(acc["pretrained"].values()) >= max(acc["none"].values()) + 0.10, acc
    assert max(acc["pretrained"].values()) >= 0.80, acc
