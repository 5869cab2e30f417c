"""Batch norm over the global batch when several processes train together (``bn_stats="update"``).

In training mode batch norm normalises with the statistics of the images it sees. Spread
over W processes, each would see only its share of the batch, so the features (and the
running statistics learnt) would differ from a single process on the same batch. The
synchronised layer sums the share's per-channel sums and squared deviations across the
processes (two ``all_reduce`` calls that autograd differentiates through, so gradients flow
to every share), which gives exactly the single-process batch statistics, in two passes for
the same accuracy as ``F.batch_norm``. ``torch.nn.SyncBatchNorm`` computes the same but
refuses CPU tensors, and the gloo backend on CPU is where the multi-process path is tested;
this layer runs on either.

Layers in eval mode (every frozen block, all of them with ``bn_stats="frozen"``, and every
evaluation) use their running statistics and never communicate. A process whose share has
no readable image takes part with an empty batch (it adds nothing to the sums).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """The sum over processes, differentiable: the gradient of a sum that every process uses is
    the sum of their gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class SyncedBatchNorm(_BatchNorm):
    """A batch norm layer (BatchNorm1d/2d/3d, or timm's BatchNormAct2d with its activation and
    dropout) whose training-mode statistics are those of the batch summed over all processes."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def replacing(cls, bn: _BatchNorm) -> SyncedBatchNorm:
        """A layer sharing ``bn``'s parameters, buffers and mode (so optimisers and state dicts
        see the same tensors under the same names)."""
        synced = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            synced.weight, synced.bias = bn.weight, bn.bias
        synced.running_mean, synced.running_var = bn.running_mean, bn.running_var
        synced.num_batches_tracked = bn.num_batches_tracked
        for name, child in bn.named_children():  # timm's BatchNormAct2d: drop, then act
            synced.add_module(name, child)
        synced.train(bn.training)
        for name, module in bn.named_modules():  # modes are per module (frozen groups)
            synced.get_submodule(name).training = module.training
        return synced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            x = self._synchronised(x)
        else:
            x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x

    def _synchronised(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / max(1, xf.shape[1])])])
        total = _all_reduce_sum(local)
        count = total[-1]
        mean = total[:-1] / count
        centred = xf - mean.view(shape)
        var = _all_reduce_sum((centred * centred).sum(dims)) / count  # biased: what normalises
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), count.item())
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """As ``F.batch_norm`` does: momentum (or a cumulative average), unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def synchronise_batchnorm(net: nn.Module) -> int:
    """Replace every batch norm layer of ``net`` in place by a :class:`SyncedBatchNorm`; returns how many."""
    replaced = 0
    for name, module in list(net.named_modules()):
        if not isinstance(module, _BatchNorm) or isinstance(module, SyncedBatchNorm) or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, SyncedBatchNorm.replacing(module))
        replaced += 1
    return replaced
