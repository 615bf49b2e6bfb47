"""The atomic registration step: a UNet that predicts a displacement field from two images.

Architecture (GradICON paper, "tallUNet2" of the reference implementation): ``L`` levels; the
down path applies leaky-ReLU then a stride-2 ``3^d`` convolution and adds an average-pooled copy of
its input (a residual skip whose channels are truncated or zero-padded at the front to fit); the up
path applies leaky-ReLU then a stride-2 ``4^d`` transposed convolution, adds a linearly upsampled
copy of its input (channels fitted the same way), normalises with BatchNorm, crops to the skip's
size and concatenates the skip. A final ``3^d`` convolution, initialised to zero so that an untrained
step is the identity map, gives ``d`` channels that are divided by 10: the displacement in CUBE units.

Parameter names (``downConvs``, ``upConvs``, ``batchNorms``, ``lastConv``) are those of the
published weight files, so that their state dicts load without renaming.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import performance
from .separable import product_along_axis

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
NORMALIZATIONS = ("batch", "instance")
_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}

#: Channel widths of the published GradICON / uniGradICON / multiGradICON steps.
PUBLISHED_DOWN_CHANNELS = (16, 32, 64, 256, 512)
PUBLISHED_UP_CHANNELS = (16, 32, 64, 128, 256)


def fit_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``, or prepend zero channels to reach that number."""
    have = x.shape[1]
    if have >= channels:
        return x[:, :channels]
    pad = x.new_zeros((x.shape[0], channels - have, *x.shape[2:]))
    return torch.cat([pad, x], dim=1)


def _upsample_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``U [2n, n]``: ``interpolate(scale_factor=2, mode="linear", align_corners=False)`` along one axis.

    Output node ``o`` reads the input at ``max(o / 2 - 1/4, 0)``: weights 1/4 and 3/4 on the two
    nearest nodes, the border node repeated beyond the last.
    """
    out = torch.arange(2 * n, dtype=torch.float64)
    source = (out / 2 - 0.25).clamp_min(0)
    low = source.floor().long()
    fraction = source - low
    high = (low + 1).clamp_max(n - 1)
    matrix = torch.zeros(2 * n, n, dtype=torch.float64)
    matrix.index_put_((out.long(), low), 1 - fraction, accumulate=True)
    matrix.index_put_((out.long(), high), fraction, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


def upsample_by_products(x: torch.Tensor) -> torch.Tensor:
    """``interpolate(x, scale_factor=2, mode="(bi/tri)linear", align_corners=False)`` as one product
    with a banded matrix per axis (:func:`_upsample_matrix`).

    The same weights and the same function (only the float rounding differs), computed by BLAS
    matrix kernels forward and backward: on 2 CPU cores an ``[1, 8, 48^3]`` tensor is upsampled in
    14 ms and differentiated in 9 ms, against 35 and 41 ms for ``interpolate`` (more on channels-last
    input).
    """
    x = x.contiguous()
    for axis in range(x.dim() - 2):
        x = product_along_axis(x, _upsample_matrix(x.shape[2 + axis], x.device, x.dtype), axis)
    return x


class UNetStep(nn.Module):
    """One registration step: ``(image_A, image_B) -> displacement`` in CUBE units.

    Args:
        dimension: 2 or 3.
        input_channels: channels per image (1 for intensity images).
        down_channels: output channels of each down level (the published models: 16, 32, 64, 256, 512).
        up_channels: output channels of each up level, finest first (published: 16, 32, 64, 128, 256).
        normalization: ``batch`` (BatchNorm, as published) or ``instance`` (InstanceNorm with BatchNorm's
            learnt scale and shift and no running statistics: every image pair is normalised by its
            own statistics, in training and at inference alike; for networks trained with one pair
            per step, where BatchNorm's running statistics never describe a single pair). The module
            names (``batchNorms``) stay those of the published files.

    Shapes:
        ``image_A``, ``image_B``: ``[B, input_channels, *spatial]``; output ``[B, dimension, *spatial]``.
    """

    def __init__(self, dimension: int = 3, input_channels: int = 1,
                 down_channels: Sequence[int] = PUBLISHED_DOWN_CHANNELS,
                 up_channels: Sequence[int] = PUBLISHED_UP_CHANNELS, normalization: str = "batch") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {normalization!r}")
        if dimension not in _CONV:
            raise ValueError(f"dimension must be 2 or 3, not {dimension}")
        if len(down_channels) != len(up_channels):
            raise ValueError(f"down_channels {tuple(down_channels)} and up_channels "
                             f"{tuple(up_channels)} must have the same number of levels")
        self.dimension = dimension
        levels = len(down_channels)
        widths = [2 * input_channels, *down_channels]
        # the up level at depth k receives the down output of depth k plus the up output of depth k+1
        up_inputs = [widths[k + 1] + (up_channels[k + 1] if k + 1 < levels else 0) for k in range(levels)]
        conv, conv_t = _CONV[dimension], _CONV_T[dimension]
        if normalization == "batch":
            norm = _BATCH_NORM[dimension]
        else:
            def norm(channels: int) -> nn.Module:
                return _INSTANCE_NORM[dimension](channels, affine=True, track_running_stats=False)
        self.downConvs = nn.ModuleList(
            conv(widths[k], widths[k + 1], kernel_size=3, padding=1, stride=2) for k in range(levels))
        self.upConvs = nn.ModuleList(
            conv_t(up_inputs[k], up_channels[k], kernel_size=4, padding=1, stride=2) for k in range(levels))
        self.batchNorms = nn.ModuleList(norm(up_channels[k]) for k in range(levels))
        self.lastConv = conv(widths[0] + up_channels[0], dimension, kernel_size=3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        settings = performance.current()
        if self.training or not settings.enabled or not self._batch_norms_frozen():
            return self._forward_plain(image_A, image_B)
        return self._forward_fast(image_A, image_B, settings)

    def _forward_plain(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        """The published architecture, operation by operation (training, and the reference for tests).

        With the fast paths enabled (:mod:`.performance`), the same operations run with
        channels-last convolution inputs and the residual upsampling by matrix products on the CPU:
        only float rounding differs from ``fast_paths(enabled=False)``.
        """
        pool, mode = _POOL[self.dimension], _LINEAR_MODE[self.dimension]
        settings = performance.current()
        channels_last = (settings.enabled and settings.use_channels_last(image_A.device)
                         and image_A.dim() in _CHANNELS_LAST)
        products = settings.enabled and settings.upsample_by_products and image_A.device.type == "cpu"

        def layout(t: torch.Tensor) -> torch.Tensor:
            # the same operations with every convolution's input channels-last: oneDNN's CPU
            # convolutions, above all their backward (training's step), run several times faster so
            return t.contiguous(memory_format=_CHANNELS_LAST[t.dim()]) if channels_last else t

        x = torch.cat([image_A, image_B], dim=1)
        skips = []
        for down in self.downConvs:
            skips.append(x)
            y = down(layout(F.leaky_relu(x)))
            x = y + fit_channels(pool(x, 2, ceil_mode=True), y.shape[1])
        for depth in reversed(range(len(self.upConvs))):
            y = self.upConvs[depth](layout(F.leaky_relu(x)))
            if products:
                x = y + upsample_by_products(fit_channels(x, y.shape[1]))
            else:
                x = y + F.interpolate(fit_channels(x, y.shape[1]), scale_factor=2, mode=mode,
                                      align_corners=False)
            x = self.batchNorms[depth](x)
            skip = skips[depth]
            x = x[(slice(None), slice(None), *(slice(0, n) for n in skip.shape[2:]))]
            x = torch.cat([x, skip], dim=1)
        return self.lastConv(layout(x)) / 10

    # ---- fast path (evaluation mode; see :mod:`.performance`) -------------------------------------
    def _batch_norms_frozen(self) -> bool:
        """BatchNorm layers apply fixed running statistics (evaluation mode), so they can be folded
        (never for instance normalisation, whose statistics are the input's own)."""
        return all(isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training
                   and bn.running_mean is not None and bn.running_var is not None for bn in self.batchNorms)

    def _can_fuse_last_level(self, fine_shape: Sequence[int]) -> bool:
        conv_t, last, d = self.upConvs[0], self.lastConv, self.dimension
        return (tuple(conv_t.kernel_size) == (4,) * d and tuple(conv_t.stride) == (2,) * d
                and tuple(conv_t.padding) == (1,) * d and tuple(conv_t.output_padding) == (0,) * d
                and tuple(conv_t.dilation) == (1,) * d and conv_t.groups == 1
                and tuple(last.kernel_size) == (3,) * d and tuple(last.stride) == (1,) * d
                and tuple(last.padding) == (1,) * d and tuple(last.dilation) == (1,) * d
                and last.groups == 1 and all(int(n) >= 4 for n in fine_shape))

    def _forward_fast(self, image_A: torch.Tensor, image_B: torch.Tensor,
                      settings: performance.FastPaths) -> torch.Tensor:
        """The same function as :meth:`_forward_plain` with BatchNorm's running statistics folded in."""
        pool = _POOL[self.dimension]
        x = torch.cat([image_A, image_B], dim=1)
        if settings.use_channels_last(x.device) and x.dim() in _CHANNELS_LAST:
            x = x.contiguous(memory_format=_CHANNELS_LAST[x.dim()])
        skips = []
        for down in self.downConvs:
            skips.append(x)
            y = down(F.leaky_relu(x))
            x = _add_fitted(y, pool(x, 2, ceil_mode=True))
        fuse = settings.fuse_last_level and self._can_fuse_last_level(skips[0].shape[2:])
        for depth in reversed(range(1 if fuse else 0, len(self.upConvs))):
            x = self._up_level(x, depth, skips[depth], fold=settings.fold_batch_norm)
        if fuse:
            return self._fused_last_level(x, skips[0])
        return self.lastConv(x) / 10

    def _up_level(self, x: torch.Tensor, depth: int, skip: torch.Tensor, *, fold: bool) -> torch.Tensor:
        """One up level: transposed convolution + upsampled residual, BatchNorm, crop, concatenation."""
        conv_t, bn = self.upConvs[depth], self.batchNorms[depth]
        coarse = fit_channels(x, conv_t.out_channels)
        if fold:
            scale, shift = _batch_norm_affine(bn)
            per_channel = (1, -1) + (1,) * self.dimension
            weight = conv_t.weight * scale.view(per_channel)  # [in, out, k...]: scale the outputs
            bias = shift if conv_t.bias is None else conv_t.bias * scale + shift
            y = _CONV_T_FN[self.dimension](F.leaky_relu(x), weight, bias, stride=conv_t.stride,
                                           padding=conv_t.padding, output_padding=conv_t.output_padding,
                                           groups=conv_t.groups, dilation=conv_t.dilation)
            y = y.add_(self._upsample(coarse * scale.view(per_channel)))
        else:
            y = conv_t(F.leaky_relu(x))
            y = bn(y.add_(self._upsample(coarse)))
        y = y[(slice(None), slice(None), *(slice(0, n) for n in skip.shape[2:]))]
        return torch.cat([y, skip], dim=1)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode=_LINEAR_MODE[self.dimension], align_corners=False)

    def _fused_last_level(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Finest up level and final convolution as one convolution on the coarse grid.

        With ``T`` the transposed convolution (kernel 4, stride 2, padding 1), ``U`` the linear
        upsampling of the coarse residual (itself a transposed convolution with the separable kernel
        ``[1, 3, 3, 1] / 4`` on the border-replicated input), BatchNorm ``s v + t`` and the final
        convolution ``L`` (kernel 3, zero padding 1), the output at fine voxel ``2m + r`` is a
        ``3^d`` convolution of the coarse inputs around ``m`` whose kernel depends on the phase ``r``.
        The kernels are composed here from the weights (differentiably, so instance optimisation
        trains the same parameters); the ``2^d`` phases become output channels and are interleaved
        into the fine grid afterwards. Where ``L`` reads its zero padding (the outer face of the
        output along each axis) the composition differs, and those voxels are recomputed with the
        plain operations on slabs two voxels thick.
        """
        d = self.dimension
        c_out = self.lastConv.out_channels
        kernel, bias, skip_kernel = self._fused_weights()
        coarse = fit_channels(x, self.upConvs[0].out_channels)
        stacked = _padded_stack(x, coarse)
        phases = _CONV_FN[d](stacked, kernel.to(stacked.dtype), bias.to(stacked.dtype))
        fine = _phases_to_grid(phases, c_out, d)
        fine = fine[(slice(None), slice(None), *(slice(0, n) for n in skip.shape[2:]))]
        out = fine + _CONV_FN[d](skip, skip_kernel.to(skip.dtype), None, padding=1)
        self._exact_faces(out, x, skip)
        return out

    def _fused_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kernel ``[2^d c_out, c_in + c_mid, 3^d]``, bias and skip kernel of :meth:`_fused_last_level`.

        Computed from the current parameters (differentiably), in at least float32 precision and
        with autocast off.
        """
        d = self.dimension
        conv_t, bn, last = self.upConvs[0], self.batchNorms[0], self.lastConv
        c_mid = conv_t.out_channels
        device = conv_t.weight.device
        dtype = torch.promote_types(conv_t.weight.dtype, torch.float32)
        with torch.autocast(device_type=device.type, enabled=False):
            scale, shift = (t.to(dtype) for t in _batch_norm_affine(bn))
            per_channel = (1, -1) + (1,) * d
            w_t = conv_t.weight.to(dtype) * scale.view(per_channel)
            taps = torch.tensor([0.25, 0.75, 0.75, 0.25], device=device, dtype=dtype)
            separable = taps
            for _ in range(d - 1):
                separable = separable[..., None] * taps
            eye = torch.eye(c_mid, device=device, dtype=dtype).view(c_mid, c_mid, *([1] * d))
            w_up = eye * scale.view(per_channel) * separable
            mid_weights = torch.cat([w_t, w_up], dim=0)  # [c_in + c_mid, c_mid, 4^d]
            l_mid = last.weight[:, :c_mid].to(dtype) / 10
            composed = _CONV_FN[d](mid_weights, l_mid, None, padding=2)  # [c_all, c_out, 6^d]
            kernels = []
            for phase in itertools.product((0, 1), repeat=d):
                taps_of_phase = composed[(slice(None), slice(None), *(slice(r, None, 2) for r in phase))]
                kernels.append(taps_of_phase.flip(tuple(range(2, 2 + d))).transpose(0, 1))
            kernel = torch.cat(kernels, dim=0)  # phase-major: channel = phase * c_out + o
            constant = shift if conv_t.bias is None else conv_t.bias.to(dtype) * scale + shift
            bias = (l_mid * constant.view(per_channel)).sum(dim=tuple(range(1, 2 + d)))
            if last.bias is not None:
                bias = bias + last.bias.to(dtype) / 10
            skip_kernel = last.weight[:, c_mid:].to(dtype) / 10
        return kernel, bias.repeat(2 ** d), skip_kernel

    def _exact_faces(self, out: torch.Tensor, x: torch.Tensor, skip: torch.Tensor) -> None:
        """Overwrite the outer face of ``out`` along every axis with the plain computation.

        Output face ``o = 0`` reads the finest up level at fine planes 0 and 1, face ``o = N - 1``
        at planes ``N - 2`` and ``N - 1``; a fine plane ``p`` of the transposed convolution sums the
        coarse planes ``i`` with ``k = p - 2 i + 1`` in ``[0, 3]`` through the kernel slice ``k``, and
        its upsampled residual reads coarse planes ``p // 2`` and its neighbour (clamped), all among
        the two coarse planes next to the face. So each face is a ``(d-1)``-dimensional transposed
        convolution of two coarse planes, an upsampling, BatchNorm and a ``(d-1)``-dimensional
        convolution: a few hundred MFLOP at 175^3.
        """
        d = self.dimension
        conv_t, last = self.upConvs[0], self.lastConv
        c_mid = conv_t.out_channels
        conv_t_fn, conv_fn = _CONV_T_FN[d - 1], _CONV_FN[d - 1]
        scale, shift = _batch_norm_affine(self.batchNorms[0])
        constant = shift if conv_t.bias is None else conv_t.bias * scale + shift
        weight_t = conv_t.weight * scale.view((1, -1) + (1,) * d)
        sides = []
        for axis in range(d):
            n_fine, n_coarse = skip.shape[2 + axis], x.shape[2 + axis]
            sides += [(axis, 0, 0, 0), (axis, 1, n_coarse - 2, n_fine - 2)]
        wanted = sorted({(2 + axis, c0 + i) for axis, _, c0, _ in sides for i in (0, 1)})
        planes = dict(zip(wanted, _GatherPlanes.apply(x, tuple(wanted))))
        for axis, side, c0, p0 in sides:
            dim = 2 + axis
            coarse = {c: planes[(dim, c)] for c in (c0, c0 + 1)}
            x_planes = torch.cat([F.leaky_relu(coarse[c]) for c in (c0, c0 + 1)], dim=1)
            # kernel block (coarse plane c -> fine plane p) = slice k = p - 2c + 1 of the kernel
            blocks = []
            for c in (c0, c0 + 1):
                row = []
                for p in (p0, p0 + 1):
                    k = p - 2 * c + 1
                    row.append(weight_t.select(dim, k) if 0 <= k <= 3
                               else weight_t.new_zeros(weight_t.select(dim, 0).shape))
                blocks.append(torch.cat(row, dim=1))
            y = conv_t_fn(x_planes, torch.cat(blocks, dim=0), constant.repeat(2), stride=2, padding=1)
            faces = []
            for j, p in enumerate((p0, p0 + 1)):
                m, r = divmod(p, 2)
                near = fit_channels(coarse[m], c_mid)
                far = fit_channels(coarse[min(max(m + (1 if r else -1), 0), x.shape[dim] - 1)], c_mid)
                residual = (0.75 * near + 0.25 * far) * scale.view((1, -1) + (1,) * (d - 1))
                plane = y[:, j * c_mid:(j + 1) * c_mid] + self._upsample_lower(residual)
                plane = plane[(slice(None), slice(None),
                               *(slice(0, n) for a, n in enumerate(skip.shape[2:]) if a != axis))]
                faces += [plane, skip.select(dim, p).to(plane.dtype)]
            # the output plane p0 + side reads fine planes p0, p0 + 1 through taps 1 - side, 2 - side
            weight = torch.cat([last.weight.select(dim, 1 - side), last.weight.select(dim, 2 - side)], dim=1)
            face = conv_fn(torch.cat(faces, dim=1), weight / 10, None if last.bias is None else last.bias / 10,
                           padding=1)
            out.select(dim, p0 + side).copy_(face)

    def _upsample_lower(self, x: torch.Tensor) -> torch.Tensor:
        """Linear upsampling by 2 of a ``(d-1)``-dimensional plane (``align_corners=False``)."""
        mode = {1: "linear", 2: "bilinear"}[self.dimension - 1]
        return F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """Channels-last when ``x`` is laid out so (and not also contiguous), else the default layout."""
    channels_last = _CHANNELS_LAST.get(x.dim())
    if channels_last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


class _GatherPlanes(torch.autograd.Function):
    """Copies of several planes ``x.select(dim, index)``; the gradient is gathered into one tensor.

    (Selecting the planes one by one would make autograd allocate, zero and add a tensor of
    ``x``'s size for each plane during the backward pass.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, where: Tuple[Tuple[int, int], ...]) -> Tuple[torch.Tensor, ...]:
        ctx.where = where
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        ctx.memory_format = _layout_of(x)
        return tuple(x.select(dim, index).clone() for dim, index in where)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device).contiguous(memory_format=ctx.memory_format)
        for (dim, index), g in zip(ctx.where, grads):
            if g is not None:
                grad.select(dim, index).add_(g)
        return grad, None


def _padded_stack(x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``cat([zero_pad(leaky_relu(x)), replicate_pad(coarse)])`` with a one-voxel halo on every axis.

    Without autograd the result is written into one buffer (the halo faces filled axis by axis,
    which also fills edges and corners): the same values as the padded copies and their
    concatenation, without three intermediate tensors of the finest coarse level.
    """
    d = x.dim() - 2
    halo = [1] * (2 * d)
    if torch.is_grad_enabled() and (x.requires_grad or coarse.requires_grad):
        return torch.cat([F.pad(F.leaky_relu(x), halo), F.pad(coarse, halo, mode="replicate")], dim=1)
    c_x = x.shape[1]
    stacked = torch.empty((x.shape[0], c_x + coarse.shape[1], *(n + 2 for n in x.shape[2:])),
                          dtype=x.dtype, device=x.device, memory_format=_layout_of(x))
    interior = (slice(None), slice(None), *([slice(1, -1)] * d))
    activated, replicated = stacked[:, :c_x], stacked[:, c_x:]
    torch.ops.aten.leaky_relu.out(x, 0.01, out=activated[interior])  # F.leaky_relu's default slope
    replicated[interior].copy_(coarse)
    for axis in range(2, 2 + d):
        activated.select(axis, 0).zero_()
        activated.select(axis, -1).zero_()
        replicated.select(axis, 0).copy_(replicated.select(axis, 1))
        replicated.select(axis, -1).copy_(replicated.select(axis, -2))
    return stacked


def _batch_norm_affine(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(v) = scale * v + shift`` per channel (running statistics)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _add_fitted(y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``y + fit_channels(residual, y.shape[1])`` in place, without materialising zero channels."""
    have, want = residual.shape[1], y.shape[1]
    if have >= want:
        return y.add_(residual[:, :want])
    y[:, want - have:] += residual
    return y


def _phases_to_grid(phases: torch.Tensor, channels: int, d: int) -> torch.Tensor:
    """``[B, 2^d C, *n]`` (channel = phase * C + c, phases in lexicographic order) -> ``[B, C, *2n]``."""
    b, n = phases.shape[0], phases.shape[2:]
    grouped = phases.reshape(b, *([2] * d), channels, *n)
    order = [0, d + 1]
    for axis in range(d):
        order += [d + 2 + axis, 1 + axis]
    return grouped.permute(order).reshape(b, channels, *(2 * m for m in n))
