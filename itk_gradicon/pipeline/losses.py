"""Similarity measures, regularisers and the symmetric GradICON objective.

All functions take network-grid tensors ``[B, C, *spatial]`` (2-D or 3-D) and return scalar tensors
that can be back-propagated. Masks, where accepted, are ``[B, 1, *spatial]`` tensors; a voxel takes
part in a masked average when its mask value is non-zero, each pair is averaged over its own voxels and
the pairs are then averaged with equal weight.

Definitions follow the papers in ``shared/papers`` (GradICON, uniGradICON, multiGradICON, M2M-Reg):

* LNCC: local normalised cross-correlation with a Gaussian window (sigma 5 voxels, kernel ``4 sigma + 1``,
  zero padding); loss ``1 - mean(LNCC)``; squared variant ``1 - mean(LNCC^2)`` (multiGradICON).
* MIND-SSC: self-similarity context descriptors (Heinrich et al., MICCAI 2013), radius 2, dilation 2;
  loss = mean squared descriptor difference.
* GradICON: ``mean || d/dx (phi_AB(phi_BA(x)) - x) ||^2`` by finite differences at jittered points on
  every second voxel; GradCyCon (M2M-Reg) is the same penalty for a longer cycle of maps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..network.operators import CubeMap, identity_on
from ..network.sampling import NATIVE, run_pieces, sample_cube_field, thread_ranges
from ..network import separable
from ..network.separable import product_along_axis

Tensor = torch.Tensor
MapFn = Callable[[Tensor], Tensor]

LNCC_SIGMA = 5
LNCC_EPS = 1e-5
GRADICON_DELTA = 1e-3
GRADICON_LAMBDA = 1.5
#: MIND-SSC's patch radius and the distance of its neighbours (:func:`mind_ssc`'s defaults).
MIND_RADIUS, MIND_DILATION = 2, 2


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def masked_mean(values: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean of ``values``; with ``mask``, the mean over each pair's masked voxels, averaged over pairs."""
    if mask is None:
        return values.mean()
    included = (mask != 0).expand_as(values)
    dims = tuple(range(1, values.dim()))
    counts = included.sum(dims).clamp_min(1)
    totals = (values * included).sum(dims, dtype=torch.float32)
    return (totals / counts).mean().to(values.dtype)


def gaussian_kernel1d(sigma: float, size: Optional[int] = None, *, device=None,
                      dtype=torch.float32) -> Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (default ``4 sigma + 1``)."""
    size = int(4 * sigma + 1) if size is None else int(size)
    half = (size - 1) / 2.0
    x = torch.linspace(-half, half, size, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


#: Without the compiled kernel, axes up to this length are blurred by a banded matrix product (see
#: :func:`gaussian_blur`).
BANDED_BLUR_MAX_LENGTH = 512


def gaussian_blur(x: Tensor, sigma: float, size: Optional[int] = None) -> Tensor:
    """Separable Gaussian blur of every channel, zero padding, output the size of the input.

    Each axis is one pass of :func:`~itk_gradicon.network.separable.filter_along_axis`: float32 CPU tensors
    on the compiled kernel (the sum over the kernel's taps), otherwise, along axes of up to
    :data:`BANDED_BLUR_MAX_LENGTH` voxels, a product with a banded ``n x n`` matrix on the BLAS kernels
    (forward and backward), several times faster than PyTorch's depthwise ``conv3d`` on a CPU (figures:
    ``benchmarks/README.md``, "Design figures"); longer axes there use a depthwise convolution. All compute
    the same sums; only the order of the float additions may differ.
    """
    d = x.dim() - 2
    kernel = gaussian_kernel1d(sigma, size, device=x.device, dtype=x.dtype)
    channels = x.shape[1]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    native = separable.uses_native_filter(x, kernel)
    x = x.contiguous()
    for axis in range(d):
        n = x.shape[2 + axis]
        if n > BANDED_BLUR_MAX_LENGTH and not native:
            shape = [channels, 1] + [1] * d
            shape[2 + axis] = kernel.numel()
            x = conv(x, kernel.reshape([1, 1, *shape[2:]]).expand(*shape), padding="same", groups=channels)
            x = x.contiguous()
            continue
        x = separable.filter_along_axis(x, kernel, axis)
    return x


# ----------------------------------------------------------------------------------------------
# similarity
# ----------------------------------------------------------------------------------------------

def lncc_map(image_I: Tensor, image_J: Tensor, sigma: float = LNCC_SIGMA) -> Tensor:
    """Voxelwise local normalised cross-correlation of two images of equal shape."""
    channels = image_I.shape[1]
    moments = gaussian_blur(torch.cat([image_I, image_J, image_I * image_J, image_I * image_I, image_J * image_J],
                                      dim=1), sigma)
    mu_i, mu_j, blur_ij, blur_ii, blur_jj = moments.split(channels, dim=1)
    return _lncc_from_moments(mu_i, blur_ii, blur_ij, mu_j, blur_jj)


def _lncc_from_moments(mu_i: Tensor, blur_ii: Tensor, blur_ij: Tensor, mu_j: Tensor, blur_jj: Tensor) -> Tensor:
    cov = blur_ij - mu_i * mu_j
    var_i = torch.relu(blur_ii - mu_i ** 2) + LNCC_EPS
    var_j = torch.relu(blur_jj - mu_j ** 2) + LNCC_EPS
    return cov / torch.sqrt(var_i * var_j)


class _LNCCAgainst:
    """``lncc_map(warped, target, sigma)`` for a target that stays the same over many steps: the target's
    local moments (its windowed mean and mean square) are blurred once, and a step blurs the three
    channels that depend on the warped image (``I``, ``I J``, ``I^2``) instead of five.

    A one-channel float32 pair on the CPU runs on the compiled kernel (:class:`_CompiledLNCC`): the three
    channels made, the map computed and its gradient formed each in one pass over the voxels, where
    autograd would make a dozen; only float rounding differs."""

    def __init__(self, target: Tensor, sigma: float) -> None:
        self.target, self.sigma = target, sigma
        self.mu_j, self.blur_jj = gaussian_blur(torch.cat([target, target * target], dim=1), sigma).split(
            target.shape[1], dim=1)
        self.kernel = gaussian_kernel1d(sigma, device=target.device, dtype=target.dtype)
        self.compiled = target.shape[0] * target.shape[1] == 1 and separable.uses_native_filter(target, self.kernel)
        if self.compiled:
            self.var_j = (torch.relu(self.blur_jj - self.mu_j ** 2) + LNCC_EPS).contiguous()
            self.mu_j, self.target = self.mu_j.contiguous(), target.contiguous()

    def __call__(self, warped: Tensor) -> Tensor:
        if self.compiled and warped.shape == self.target.shape and separable.uses_native_filter(warped, self.kernel):
            return _CompiledLNCC.apply(warped, self)
        channels = warped.shape[1]
        mu_i, blur_ij, blur_ii = gaussian_blur(torch.cat([warped, warped * self.target, warped * warped], dim=1),
                                               self.sigma).split(channels, dim=1)
        return _lncc_from_moments(mu_i, blur_ii, blur_ij, self.mu_j, self.blur_jj)


#: Below this many voxels per thread a pointwise LNCC pass is not split over the threads.
MIN_LNCC_VOXELS_PER_THREAD = 1 << 15


def _lncc_part(which: int, n: int, *, out: Tensor, w: Optional[Tensor] = None, t: Optional[Tensor] = None,
               m: Optional[Tensor] = None, mu_j: Optional[Tensor] = None, var_j: Optional[Tensor] = None,
               g: Optional[Tensor] = None, blurred: Optional[Tensor] = None) -> Tensor:
    """One pointwise part of the compiled LNCC (``lncc_part`` in ``_linear.c``) over ``n`` voxels, split
    over the threads; every tensor contiguous float32 (kept referenced until the calls return)."""
    address = lambda tensor: 0 if tensor is None else tensor.data_ptr()  # noqa: E731
    run_pieces(NATIVE.lncc_part, [(which, address(w), address(t), address(m), address(mu_j), address(var_j),
                                   address(g), address(blurred), out.data_ptr(), n, LNCC_EPS, start, end)
                                  for start, end in thread_ranges(n, min_work_per_thread=MIN_LNCC_VOXELS_PER_THREAD)])
    return out


class _CompiledLNCC(torch.autograd.Function):
    """The LNCC map of a one-channel warped image against :class:`_LNCCAgainst`'s target, forward and
    backward on the compiled kernel: the moments ``I, I J, I^2`` in one pass, their Gaussian windows
    (:func:`~itk_gradicon.network.separable.filter_axes`), the map in one pass; backward, the gradients of
    the three moments in one pass, the adjoint windows, and ``G0 + J G1 + 2 I G2`` in one pass."""

    @staticmethod
    def forward(ctx, warped: Tensor, against: "_LNCCAgainst") -> Tensor:
        warped = warped.contiguous()
        n = warped.numel()
        spatial = tuple(warped.shape[2:])
        moments = _lncc_part(0, n, out=warped.new_empty((1, 3, *spatial)), w=warped, t=against.target)
        moments = separable.filter_axes(moments, against.kernel)
        ctx.save_for_backward(warped, moments)
        ctx.against = against
        return _lncc_part(1, n, out=torch.empty_like(warped), m=moments, mu_j=against.mu_j, var_j=against.var_j)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        warped, moments = ctx.saved_tensors
        against = ctx.against
        n = warped.numel()
        grads = _lncc_part(2, n, out=torch.empty_like(moments), m=moments, mu_j=against.mu_j, var_j=against.var_j,
                           g=grad.contiguous().float())
        blurred = separable.filter_axes(grads, against.kernel, adjoint=True)
        return _lncc_part(3, n, out=torch.empty_like(warped), w=warped, t=against.target, blurred=blurred), None


def lncc_loss(warped: Tensor, target: Tensor, mask: Optional[Tensor] = None,
              sigma: float = LNCC_SIGMA) -> Tensor:
    """``1 - mean(LNCC)`` over the (masked) voxels of ``target``'s grid."""
    _check_same_shape(warped, target, mask)
    return 1 - masked_mean(lncc_map(warped, target, sigma), mask)


def squared_lncc_loss(warped: Tensor, target: Tensor, mask: Optional[Tensor] = None,
                      sigma: float = LNCC_SIGMA) -> Tensor:
    """``1 - mean(LNCC^2)``: insensitive to the sign of the correlation (multiGradICON)."""
    _check_same_shape(warped, target, mask)
    return 1 - masked_mean(lncc_map(warped, target, sigma) ** 2, mask)


def _neighbour_pairs(d: int):
    """Pairs of the 2d face neighbours that are not opposite (12 in 3-D, 4 in 2-D)."""
    offsets = []
    for axis in range(d):
        for sign in (-1, 1):
            o = [0] * d
            o[axis] = sign
            offsets.append(tuple(o))
    return [(a, b) for i, a in enumerate(offsets) for b in offsets[:i]
            if sum((x - y) ** 2 for x, y in zip(a, b)) == 2]


def _replicate_box_matrix(length: int, radius: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``M [length, length]``: ``(M x)[i]`` is the mean of ``x[clamp(i + t)]`` over ``t`` in ``[-radius, radius]``
    (the box mean of ``x`` padded by replicating its end values)."""
    rows = torch.arange(length, device=device)[:, None]
    taps = torch.arange(-radius, radius + 1, device=device)[None, :]
    columns = (rows + taps).clamp(0, length - 1)
    matrix = torch.zeros(length, length, dtype=torch.float64, device=device)
    matrix.scatter_add_(1, columns, torch.full(columns.shape, 1.0 / (2 * radius + 1), dtype=torch.float64,
                                               device=device))
    return matrix.to(dtype)


def _box_kernel(radius: int, *, like: Tensor) -> Tensor:
    """The 1-D box of ``2 radius + 1`` equal taps (summing to 1) in ``like``'s dtype and device."""
    return torch.full((2 * radius + 1,), 1.0 / (2 * radius + 1), dtype=like.dtype, device=like.device)


def box_mean(x: Tensor, radius: int) -> Tensor:
    """Mean over the ``(2 radius + 1)^d`` box around every voxel, replicate padding, every channel: the
    values of ``avg_pool(pad(x, radius, "replicate"), 2 radius + 1, stride=1)`` as one banded matrix product
    per axis (faster on a CPU, forward and backward: ``benchmarks/README.md``, "Design figures")."""
    x = x.contiguous()
    box = _box_kernel(radius, like=x)
    if separable.uses_native_filter(x, box):  # the compiled filter (about 4x faster at 96^3, float rounding only)
        for axis in range(x.dim() - 2):
            x = separable.filter_along_axis_replicate(x, box, axis)
        return x
    for axis in range(x.dim() - 2):
        x = product_along_axis(x, _replicate_box_matrix(x.shape[2 + axis], radius, device=x.device, dtype=x.dtype),
                               axis)
    return x


def mind_ssc(image: Tensor, radius: int = MIND_RADIUS, dilation: int = MIND_DILATION) -> Tensor:
    """MIND-SSC descriptors ``[B, P, *spatial]`` of a single-channel image (P = 12 in 3-D, 4 in 2-D).

    For every pair ``(a, b)`` of non-opposite face neighbours at distance ``dilation``, the patch
    distance is the box mean (side ``2 radius + 1``, replicate padding) of
    ``(I(x + dilation a) - I(x + dilation b))^2``; distances are shifted by their minimum over pairs,
    divided by their mean over pairs (clamped to [0.001, 1000] times its global mean) and mapped
    through ``exp(-.)``.
    """
    d = image.dim() - 2
    if image.shape[1] != 1:
        raise ValueError(f"mind_ssc needs single-channel images, got {image.shape[1]} channels")
    pad = [dilation] * (2 * d)
    padded = F.pad(image, pad, mode="replicate")
    spatial = image.shape[2:]

    def shifted(offset):
        index = [slice(None), slice(None)]
        index += [slice(dilation + dilation * o, dilation + dilation * o + n) for o, n in zip(offset, spatial)]
        return padded[tuple(index)]

    diffs = torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in _neighbour_pairs(d)], dim=1)
    return _MINDFromDistances.apply(box_mean(diffs, radius))


class _MINDFromDistances(torch.autograd.Function):
    """MIND-SSC's last step, ``exp(-(D - min_c D) / clamp(mean_c(D - min_c D)))`` of the patch distances
    ``D`` ``[B, P, ...]``, with its backward pass written out: the same values as autograd through the
    chain of ``min``, ``mean``, ``clamp``, ``div`` and ``exp`` (gradients equal to float rounding), in
    fewer passes over the ``P`` channels (figures: ``benchmarks/README.md``, "Design figures").
    The clamp bounds (0.001 and 1000 times the global mean variance) are constants, as ``.item()``
    makes them in the autograd form."""

    @staticmethod
    def forward(ctx, distances: Tensor) -> Tensor:
        lowest, index = distances.min(dim=1, keepdim=True)
        mind = distances - lowest
        variance = mind.mean(dim=1, keepdim=True)
        level = variance.mean().item()
        low, high = level * 0.001, level * 1000
        clamped = variance.clamp(low, high)
        out = torch.exp(-mind / clamped)
        ctx.save_for_backward(out, mind, clamped, index, (variance >= low) & (variance <= high))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        out, mind, variance, index, unclamped = ctx.saved_tensors
        weighted = grad * out                                    # dL/dy * y
        through_variance = (weighted * mind).sum(1, keepdim=True) / (variance * variance)
        grad_mind = through_variance * unclamped / mind.shape[1] - weighted / variance
        grad_mind.scatter_add_(1, index, -grad_mind.sum(1, keepdim=True))  # the minimum's share
        return grad_mind


class _MINDAgainst:
    """The squared MIND-SSC descriptor differences of a warped image to a target that stays the same over
    many steps (``[B, P, *spatial]``, or their mean over the ``P`` channels ``[1, 1, *spatial]`` on the
    compiled kernel: the same masked mean), the target's descriptors computed once (:data:`MIND_RADIUS`,
    :data:`MIND_DILATION`).

    A one-channel 3-D float32 image on the CPU runs on the compiled kernel (:class:`_CompiledMIND`): the
    patch differences, the descriptors and their differences, and each part of the gradient in one pass over
    the voxels, where autograd makes about forty; only float rounding differs."""

    def __init__(self, target: Tensor) -> None:
        self.target = target
        self.descriptors = mind_ssc(target).contiguous()
        self.box = _box_kernel(MIND_RADIUS, like=target)
        self.compiled = (target.dim() == 5 and target.shape[0] * target.shape[1] == 1
                         and separable.uses_native_filter(target, self.box))
        if self.compiled:  # each pair's two neighbours as voxel offsets (z, y, x of a, then of b)
            self.offsets = torch.tensor([[MIND_DILATION * v for v in a + b] for a, b in _neighbour_pairs(3)],
                                        dtype=torch.int64)

    def __call__(self, warped: Tensor) -> Tensor:
        if self.compiled and warped.shape == self.target.shape and separable.uses_native_filter(warped, self.box):
            return _CompiledMIND.apply(warped, self)
        return (mind_ssc(warped) - self.descriptors) ** 2


#: Below this many voxels per thread a compiled MIND pass is not split over the threads.
MIN_MIND_VALUES_PER_THREAD = 1 << 14


def _mind_part(which: int, against: _MINDAgainst, shape, *, out: Tensor, image: Optional[Tensor] = None,
               a: Optional[Tensor] = None, b: Optional[Tensor] = None, g: Optional[Tensor] = None,
               warped_descriptors: Optional[Tensor] = None, low: float = 0.0, high: float = 0.0) -> float:
    """One part of the compiled MIND (``mind_part`` in ``_linear.c``) over the rows of a ``shape`` grid, split
    over the threads; every tensor contiguous (kept referenced until the calls return). Returns the sum the
    part adds up (the variances' for part 1, else 0)."""
    address = lambda tensor: 0 if tensor is None else tensor.data_ptr()  # noqa: E731
    depth, height, width = shape
    ranges = thread_ranges(depth * height, width, MIN_MIND_VALUES_PER_THREAD)
    sums = torch.zeros(len(ranges), dtype=torch.float64)
    run_pieces(NATIVE.mind_part, [
        (which, address(image), address(a), address(b), against.descriptors.data_ptr(), address(g),
         address(warped_descriptors), out.data_ptr(), sums[k:].data_ptr(), against.offsets.data_ptr(),
         against.offsets.shape[0], depth, height, width, against.box.data_ptr(), against.box.numel(), low, high,
         start, end)
        for k, (start, end) in enumerate(ranges)])
    return float(sums.sum())


class _CompiledMIND(torch.autograd.Function):
    """The mean over MIND-SSC's channels of the squared descriptor differences of a one-channel warped image to
    :class:`_MINDAgainst`'s target, forward and backward on the compiled kernel: the patch differences and their
    box mean along the last axis in one pass, along the two others by
    :func:`~itk_gradicon.network.separable.replicate_filter_axes`, the variance in one pass, the exponents in
    another (PyTorch's ``exp`` in place), the differences in a third (the clamp bounds, 0.001 and 1000 times the
    mean variance, constants as in :class:`_MINDFromDistances`); backward, the distances' gradient and the box's
    transpose along the last axis in one pass, along the others, and the image's gradient in two."""

    @staticmethod
    def forward(ctx, warped: Tensor, against: _MINDAgainst) -> Tensor:
        warped = warped.contiguous()
        shape = tuple(warped.shape[2:])
        channels = (1, against.offsets.shape[0], *shape)
        distances = warped.new_empty(channels)
        _mind_part(0, against, shape, out=distances, image=warped)
        distances = separable.replicate_filter_axes(distances, against.box, axes=(0, 1))  # the last: in part 0
        variance = torch.empty_like(warped)
        level = _mind_part(1, against, shape, out=variance, a=distances) / variance.numel()
        low, high = level * 0.001, level * 1000
        descriptors = warped.new_empty(channels)
        _mind_part(2, against, shape, out=descriptors, a=distances, b=variance, low=low, high=high)
        descriptors.exp_()
        out = torch.empty_like(warped)
        _mind_part(3, against, shape, out=out, warped_descriptors=descriptors)
        ctx.save_for_backward(warped, distances, variance, descriptors)
        ctx.against, ctx.bounds = against, (low, high)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        warped, distances, variance, descriptors = ctx.saved_tensors
        against, (low, high) = ctx.against, ctx.bounds
        shape = tuple(warped.shape[2:])
        grads = torch.empty_like(distances)
        _mind_part(4, against, shape, out=grads, a=distances, b=variance, g=grad.contiguous().float(),
                   warped_descriptors=descriptors, low=low, high=high)
        grads = separable.replicate_filter_axes(grads, against.box, adjoint=True, axes=(0, 1)).contiguous()
        _mind_part(5, against, shape, out=grads, image=warped)
        result = torch.empty_like(warped)
        _mind_part(6, against, shape, out=result, a=grads)
        return result, None


def mind_loss(warped: Tensor, target: Tensor, mask: Optional[Tensor] = None,
              radius: int = MIND_RADIUS, dilation: int = MIND_DILATION) -> Tensor:
    """Mean squared difference of MIND-SSC descriptors (modality independent)."""
    _check_same_shape(warped, target, mask)
    diff = mind_ssc(warped, radius, dilation) - mind_ssc(target, radius, dilation)
    return masked_mean(diff ** 2, mask)


def against(similarity: Callable[..., Tensor], target: Tensor, mask: Optional[Tensor] = None
            ) -> Callable[[Tensor], Tensor]:
    """``similarity(warped, target, mask)`` as a function of ``warped`` alone, for a target that stays the
    same over many steps (instance optimisation): MIND-SSC's target descriptors, and the LNCC losses'
    blurred target moments, are computed once."""
    if similarity is mind_loss:
        _check_same_shape(target, target, mask)
        mind = _MINDAgainst(target)
        return lambda warped: masked_mean(mind(_same_shape(warped, target)), mask)
    function, sigma = _lncc_parts(similarity)
    if function is not None:
        _check_same_shape(target, target, mask)
        lncc = _LNCCAgainst(target, sigma)
        if function is lncc_loss:
            return lambda warped: 1 - masked_mean(lncc(_same_shape(warped, target)), mask)
        return lambda warped: 1 - masked_mean(lncc(_same_shape(warped, target)) ** 2, mask)
    return lambda warped: similarity(warped, target, mask)


def _lncc_parts(similarity) -> Tuple[Optional[Callable[..., Tensor]], float]:
    """``(lncc_loss or squared_lncc_loss, sigma)`` for those two (plain, or with their ``sigma`` bound by
    :func:`similarity_function`); ``(None, 0)`` for any other similarity."""
    sigma = LNCC_SIGMA
    if isinstance(similarity, functools.partial) and not similarity.args and set(similarity.keywords) <= {"sigma"}:
        sigma = similarity.keywords.get("sigma", LNCC_SIGMA)
        similarity = similarity.func
    if similarity is lncc_loss or similarity is squared_lncc_loss:
        return similarity, float(sigma)
    return None, 0.0


def _same_shape(warped: Tensor, target: Tensor) -> Tensor:
    _check_same_shape(warped, target, None)
    return warped


def _check_same_shape(a: Tensor, b: Tensor, mask: Optional[Tensor]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if mask is not None and mask.shape[2:] != b.shape[2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(b.shape)}")


SIMILARITIES = {"lncc": lncc_loss, "lncc2": squared_lncc_loss, "mind": mind_loss}


def similarity_function(name: str, *, lncc_sigma: Optional[float] = None) -> Callable[..., Tensor]:
    """The similarity loss called ``name`` (one of ``lncc``, ``lncc2``, ``mind``); ``lncc_sigma`` sets the
    window of the two LNCC losses (``None``: :data:`LNCC_SIGMA`; MIND has no window and ignores it)."""
    try:
        function = SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity {name!r}; allowed: {', '.join(SIMILARITIES)}") from None
    if lncc_sigma is None or function is mind_loss:
        return function
    return functools.partial(function, sigma=float(lncc_sigma))


# ----------------------------------------------------------------------------------------------
# regularisers
# ----------------------------------------------------------------------------------------------

def gradicon_sample_points(shape: Sequence[int], *, like: Tensor,
                           generator: Optional[torch.Generator] = None) -> Tensor:
    """Jittered sample points for GradICON: identity ``+ 2 N(0,1) / n_last`` on every 2nd node."""
    ident = identity_on(shape, like)
    noise = torch.randn(ident.shape, generator=generator, dtype=ident.dtype,
                        device="cpu" if generator is not None else ident.device).to(ident.device)
    points = ident + 2 * noise / ident.shape[-1]
    return points[(slice(None), slice(None), *([slice(None, None, 2)] * len(shape)))]


def cycle_gradient_penalty(maps: Sequence[MapFn], points: Tensor, delta: float = GRADICON_DELTA) -> Tensor:
    """``sum_i mean(((e(x) - e(x + delta u_i)) / delta)^2)`` with ``e(x) = x - m_1(m_2(...m_n(x)))``.

    With ``maps = (phi_AB, phi_BA)`` this is the GradICON regulariser; with the four maps of an
    M2M-Reg cycle it is GradCyCon.
    """

    def cycle(x: Tensor) -> Tensor:
        for m in reversed(maps):
            x = m(x)
        return x

    d = points.shape[1]
    moved = [points]
    for axis in range(d):
        step = torch.zeros((1, d) + (1,) * d, dtype=points.dtype, device=points.device)
        step[0, axis] = delta
        moved.append(points + step)
    # the d + 1 point sets go through the cycle as one set (one sampling call per map, not d + 1:
    # the maps are pointwise, so every value is the one the sets would give one by one)
    stacked = torch.cat(moved, dim=-1)
    error, *shifted = (stacked - cycle(stacked)).chunk(d + 1, dim=-1)
    total = 0.0
    for error_d in shifted:
        total = total + torch.mean(((error - error_d) / delta) ** 2)
    return total


def gradicon_regularizer(phi_AB: MapFn, phi_BA: MapFn, points: Tensor,
                         delta: float = GRADICON_DELTA) -> Tensor:
    """GradICON: squared Frobenius norm of the Jacobian of ``phi_AB o phi_BA - id`` at ``points``."""
    return cycle_gradient_penalty((phi_AB, phi_BA), points, delta)


def soft_dice_loss(warped: Tensor, target: Tensor, valid: Optional[Tensor] = None,
                   eps: float = 1e-6) -> Tensor:
    """``1 - Dice`` of soft one-hot label maps ``[B, K, *spatial]``; ``valid`` ``[B, K]`` picks classes."""
    dims = tuple(range(2, warped.dim()))
    inter = (warped * target).sum(dims)
    dice = (2 * inter + eps) / (warped.sum(dims) + target.sum(dims) + eps)
    if valid is None:
        return 1 - dice.mean()
    valid = valid.to(dice.dtype)
    return ((1 - dice) * valid).sum(1).div(valid.sum(1).clamp_min(1)).mean()


def shared_one_hot(seg_A: Tensor, seg_B: Tensor):
    """One-hot maps of the non-zero labels present in both label tensors ``[B, 1, *spatial]``.

    Returns ``(one_hot_A, one_hot_B, valid)`` with ``valid[b, k]`` true when class ``k`` appears in
    both images of pair ``b``.
    """
    a, b = seg_A.long(), seg_B.long()
    labels = torch.unique(a)
    labels = labels[torch.isin(labels, torch.unique(b)) & (labels != 0)]
    if labels.numel() == 0:
        raise ValueError("the two label maps share no non-zero label")
    one_hot_A = torch.cat([(a == lab) for lab in labels], dim=1).to(torch.float32)
    one_hot_B = torch.cat([(b == lab) for lab in labels], dim=1).to(torch.float32)
    dims = tuple(range(2, a.dim()))
    valid = (one_hot_A.sum(dims) > 0) & (one_hot_B.sum(dims) > 0)
    return one_hot_A, one_hot_B, valid


# ----------------------------------------------------------------------------------------------
# the symmetric GradICON objective
# ----------------------------------------------------------------------------------------------

@dataclass
class LossTerms:
    """The terms of one evaluation of the objective (tensors, batch-averaged)."""

    total: Tensor
    similarity: Tensor
    regularizer: Tensor
    dice: Tensor
    phi_AB: CubeMap
    phi_BA: CubeMap

    def as_floats(self) -> dict:
        def value(term) -> float:
            return float(term.detach()) if isinstance(term, Tensor) else float(term)

        return {"total": value(self.total), "similarity": value(self.similarity),
                "regularizer": value(self.regularizer), "dice": value(self.dice)}


def warp(image: Tensor, points: Tensor, *, zero_outside: bool) -> Tensor:
    """Sample ``image`` at CUBE ``points`` (linear), zero or border value outside the cube.

    Both run on :func:`~itk_gradicon.network.sampling.sample_cube_field` (all CPU threads, the
    compiled kernel where it applies). Zero outside is ``grid_sample(padding_mode="zeros",
    align_corners=True)``'s function, computed as border sampling of the image padded with one node
    of zeros on every side, at the points moved to the padded grid's CUBE coordinates: within the
    cube and up to one node beyond it the same eight nodes are interpolated (the padding's zeros in
    place of the absent ones), farther out both give 0; only float rounding differs.
    """
    if not zero_outside:
        return sample_cube_field(image, points)
    d = points.shape[1]
    nodes = torch.tensor(image.shape[2:], dtype=points.dtype, device=points.device).reshape(1, d, *([1] * d))
    padded = F.pad(image, [1] * (2 * d))
    return sample_cube_field(padded, (points * (nodes - 1) + 1) / (nodes + 1))


@dataclass(frozen=True)
class Guidance:
    """What a pair's loss may use besides its two images.

    Attributes:
        mask_A, mask_B: loss masks on each image's grid: the similarity counts only their voxels.
        seg_A, seg_B: label maps of the two images.
        dice_weight: weight of a soft Dice term on the labels both maps share (0: none; > 0 needs both maps).
    """

    mask_A: Optional[Tensor] = None
    mask_B: Optional[Tensor] = None
    seg_A: Optional[Tensor] = None
    seg_B: Optional[Tensor] = None
    dice_weight: float = 0.0


#: Nothing but the images.
NO_GUIDANCE = Guidance()


def gradicon_objective(net: torch.nn.Module, image_A: Tensor, image_B: Tensor, *,
                       similarity: Callable[..., Tensor] = lncc_loss,
                       lmbda: float = GRADICON_LAMBDA,
                       guidance: Guidance = NO_GUIDANCE,
                       loss_A: Optional[Tensor] = None, loss_B: Optional[Tensor] = None,
                       points: Optional[Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> LossTerms:
    """Symmetric GradICON objective for a batch of pairs.

    ``sim(A o phi_AB, B; mask_B) + sim(B o phi_BA, A; mask_A) + lmbda * GradICON + dice_weight * Dice``.

    Args:
        net: network ``(A, B) -> CubeMap``.
        image_A, image_B: network inputs ``[B, C, *shape]``.
        similarity: loss ``(warped, target, mask) -> scalar`` (:func:`lncc_loss`, ...).
        guidance: loss masks, label maps and the Dice weight (:class:`Guidance`).
        loss_A, loss_B: images the similarity is computed on, when they differ from the network
            inputs (multiGradICON's loss randomisation); default the inputs.
        points: GradICON sample points (default: drawn with :func:`gradicon_sample_points`).
    """
    shape = image_A.shape[2:]
    phi_AB = net(image_A, image_B)
    phi_BA = net(image_B, image_A)
    grid_AB = phi_AB.on_grid(shape)
    grid_BA = phi_BA.on_grid(shape)
    target_A = image_A if loss_A is None else loss_A
    target_B = image_B if loss_B is None else loss_B
    g = guidance
    sim = (similarity(warp(target_A, grid_AB, zero_outside=True), target_B, g.mask_B)
           + similarity(warp(target_B, grid_BA, zero_outside=True), target_A, g.mask_A))
    if points is None:
        points = gradicon_sample_points(shape, like=image_A, generator=generator)
    reg = gradicon_regularizer(phi_AB, phi_BA, points)
    dice = image_A.new_zeros(())
    if g.dice_weight > 0:
        if g.seg_A is None or g.seg_B is None:
            raise ValueError("a Dice term needs label maps of both images")
        one_A, one_B, valid = shared_one_hot(g.seg_A, g.seg_B)
        dice = (soft_dice_loss(warp(one_A, grid_AB, zero_outside=False), one_B, valid)
                + soft_dice_loss(warp(one_B, grid_BA, zero_outside=False), one_A, valid))
    total = sim + lmbda * reg + g.dice_weight * dice
    return LossTerms(total, sim, reg, dice, phi_AB, phi_BA)


def jacobian_determinant_cube(grid_map: Tensor) -> Tensor:
    """Forward-difference Jacobian determinant of a map sampled on a network grid, in grid units.

    ``grid_map``: ``[B, d, *shape]`` CUBE positions; returns ``[B, 1, *(shape - 1)]``. Both the
    positions and the steps are measured in network voxels, so the identity gives 1.
    """
    d = grid_map.shape[1]
    shape = grid_map.shape[2:]
    to_voxels = torch.tensor([n - 1 for n in shape], dtype=grid_map.dtype, device=grid_map.device)
    positions = grid_map * to_voxels.reshape(1, d, *([1] * d))
    base = positions[(slice(None), slice(None), *([slice(0, -1)] * d))]
    columns = []
    for axis in range(d):
        ahead = [slice(0, -1)] * d
        ahead[axis] = slice(1, None)
        columns.append(positions[(slice(None), slice(None), *ahead)] - base)
    jac = torch.stack(columns, dim=-1)  # [B, d(component), ..., d(axis)]
    return torch.linalg.det(jac.movedim(1, -2))[:, None]


def fraction_folded(grid_map: Tensor) -> float:
    """Fraction of grid cells whose forward-difference Jacobian determinant is negative."""
    return float((jacobian_determinant_cube(grid_map) < 0).float().mean())


__all__ = [
    "Guidance", "NO_GUIDANCE", "masked_mean", "gaussian_blur", "lncc_map", "lncc_loss", "squared_lncc_loss",
    "mind_ssc", "mind_loss",
    "similarity_function", "SIMILARITIES", "gradicon_sample_points", "cycle_gradient_penalty",
    "gradicon_regularizer", "soft_dice_loss", "shared_one_hot", "LossTerms", "gradicon_objective",
    "warp", "jacobian_determinant_cube", "fraction_folded",
]
