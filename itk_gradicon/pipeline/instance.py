"""Instance optimisation (IO): improving one pair's registration after the network's prediction.

Two methods, both on the network grid (CUBE coordinates, ``A`` = moving, ``B`` = fixed):

* ``network`` (:func:`optimise_network`): Adam steps of the model's own symmetric GradICON objective
  on a copy of the network, as the GradICON / uniGradICON papers and the reference implementation do
  (learning rate 2e-5); the tuned copy then predicts. Each step runs the network forwards and
  backwards in both directions: seconds per step on a CPU, even for small models.
* ``field`` (:func:`refine_fields`): Adam steps directly on the two predicted displacement fields
  (``phi_AB - id`` and ``phi_BA - id``), started from the prediction, with the similarity, a diffusion
  penalty on each field (``smoothness * mean |grad u|_F^2``, the displacement gradient on the
  network grid, in voxels per voxel) and an inverse-consistency penalty (``mean |phi_BA(phi_AB(x)) - x|^2``
  and the reverse, in network voxels, weighted :data:`INVERSE_CONSISTENCY`; one of the two compositions per
  step, in turn, counted twice: :func:`alternating_inverse_consistency`) that keeps the two fields
  inverse to each other. No network pass, so a step costs a few warps of the images; in the spirit of
  the Adam instance optimisation of ConvexAdam (Siebert et al., 2021). The unknowns are the displacements
  in network voxels, and every term is computed from them as they are (:func:`warp_voxels`,
  :func:`diffusion_penalty_voxels`, :func:`alternating_round_trip`; compiled kernels on the CPU). Its
  accuracy, time and folding against ANTs SyN: ``benchmarks/ACCURACY.md``.

Both report an :class:`IOProgress` after each step and append the step's loss terms to ``history``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..network.sampling import MIN_NATIVE_POINTS_PER_THREAD, NATIVE, cube_identity, native_sampling_on, run_pieces, \
    sample_cube_field, thread_ranges
from . import losses
from .options import DEFAULT_LR, DEFAULT_SMOOTHNESS, IO_METHODS  # noqa: F401  (IO_METHODS: re-exported)

#: Weight of the inverse-consistency penalty of ``field`` IO (network voxels squared).
INVERSE_CONSISTENCY = 0.1


@dataclass
class IOProgress:
    """Reported after every instance-optimisation step.

    ``level`` names the grid of a coarse-to-fine ``field`` IO (``"half resolution"``, ``"full resolution"``;
    empty with one grid): the losses are measured on that level's grid, so they jump where it changes.
    The inverse-consistency term of ``field`` IO is one composition per step, in turn
    (:func:`alternating_inverse_consistency`).
    """

    step: int
    total: int
    losses: Dict[str, float]
    elapsed_s: float
    level: str = ""

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / max(self.step, 1) * (self.total - self.step)


Progress = Optional[Callable[[IOProgress], None]]


def optimise_network(net: torch.nn.Module, image_A: Tensor, image_B: Tensor, *, steps: int, lr: float,
                     similarity, guidance: losses.Guidance = losses.NO_GUIDANCE, progress: Progress = None,
                     history: Optional[List[Dict[str, float]]] = None,
                     generator: Optional[torch.Generator] = None) -> torch.nn.Module:
    """Adam steps of the full symmetric objective on a copy of ``net``; returns the tuned copy.

    BatchNorm layers stay in evaluation mode (running statistics), as in the reference.
    """
    history = [] if history is None else history
    tuned = copy.deepcopy(net)
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        terms = losses.gradicon_objective(tuned, image_A, image_B, similarity=similarity, guidance=guidance,
                                          generator=generator)
        terms.total.backward()
        optimizer.step()
        _report(terms.as_floats(), step, steps, start, progress, history)
    for p in tuned.parameters():
        p.requires_grad_(False)
    return tuned


def voxel_scale(shape, like: Tensor) -> Tensor:
    """Factors from CUBE units to network voxels, per component (``[1, d, 1, ...]``)."""
    scale = torch.tensor([max(n - 1, 1) for n in shape], dtype=like.dtype, device=like.device)
    return scale.view(1, -1, *([1] * len(shape)))


def diffusion_penalty(displacement: Tensor) -> Tensor:
    """``mean |grad u|_F^2`` of a CUBE displacement ``[B, d, *shape]``: the squared Frobenius norm of
    the displacement's (forward-difference) gradient in network voxels per voxel, averaged over the grid
    (for each axis, the sum over components of the squared differences along it, averaged over the
    differences' grid).

    Its gradient is written out (:class:`_Diffusion`): the adjoint of the differences, in two passes per
    axis instead of autograd's chain (about 2.5x faster at 96^3, forward and backward; figures:
    ``benchmarks/README.md``, "Design figures").
    """
    return _Diffusion.apply(displacement, voxel_scale(displacement.shape[2:], displacement))


def diffusion_penalty_voxels(displacement: Tensor) -> Tensor:
    """:func:`diffusion_penalty` of a displacement given in network voxels (field IO's unknowns). A 3-D float32 one
    on the CPU runs on the compiled kernel (``_linear.diffusion_part``: the squared differences summed in one pass,
    the gradient, a 7-point stencil, written in another, where :class:`_Diffusion` makes about a dozen); only
    float rounding differs."""
    if _compiled_diffusion_applies(displacement):
        return _CompiledDiffusion.apply(displacement)
    return _Diffusion.apply(displacement, None)


def _compiled_diffusion_applies(displacement: Tensor) -> bool:
    return (native_sampling_on() and displacement.dim() == 5 and tuple(displacement.shape[:2]) == (1, 3)
            and displacement.dtype == torch.float32 and displacement.device.type == "cpu")


def _difference_counts(shape) -> Tuple[int, ...]:
    """Forward differences per channel along each axis of a grid of ``shape`` (0 for a one-node axis)."""
    total = math.prod(shape)
    return tuple((total // n) * (n - 1) for n in shape)


class _CompiledDiffusion(torch.autograd.Function):
    """:func:`diffusion_penalty_voxels` on the compiled kernel, one range of (channel, first-axis) planes per
    thread (the sums added in float64, per thread, then in order)."""

    @staticmethod
    def _run(which: int, u: Tensor, out: Optional[Tensor], weights: Tuple[float, float, float]) -> Tensor:
        depth, height, width = u.shape[2:]
        ranges = thread_ranges(3 * depth, height * width, MIN_NATIVE_POINTS_PER_THREAD)
        sums = torch.zeros((len(ranges), 3), dtype=torch.float64)
        run_pieces(NATIVE.diffusion_part, [
            (which, u.data_ptr(), 0 if out is None else out.data_ptr(), sums[k].data_ptr(), depth, height, width,
             *weights, start, end) for k, (start, end) in enumerate(ranges)])
        return sums.sum(0)  # u, out and sums stay referenced until every call returns

    @staticmethod
    def forward(ctx, displacement: Tensor) -> Tensor:
        u = displacement.detach().contiguous()
        counts = _difference_counts(u.shape[2:])
        sums = _CompiledDiffusion._run(0, u, None, (0.0, 0.0, 0.0))
        ctx.save_for_backward(u)
        ctx.counts = counts
        return displacement.new_tensor(sum(float(sums[a]) / count for a, count in enumerate(counts) if count > 0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        g = float(grad)
        weights = tuple(2.0 * g / count if count > 0 else 0.0 for count in ctx.counts)
        out = torch.empty_like(u)
        _CompiledDiffusion._run(1, u, out, weights)
        return out


class _Diffusion(torch.autograd.Function):
    """:func:`diffusion_penalty` of ``u`` with ``scale`` (CUBE units -> network voxels, per component; ``None``:
    ``u`` is in voxels already)."""

    @staticmethod
    def forward(ctx, displacement: Tensor, scale: Optional[Tensor]) -> Tensor:
        voxels = displacement if scale is None else displacement * scale
        total = displacement.new_zeros(())
        differences = []
        for axis in range(displacement.shape[1]):
            if displacement.shape[2 + axis] > 1:
                difference = torch.diff(voxels, dim=2 + axis)
                flat = difference.reshape(-1)
                total = total + torch.dot(flat, flat) / (difference.numel() / difference.shape[1])
                differences.append((axis, difference))
        ctx.differences, ctx.shape, ctx.scale = differences, displacement.shape, scale
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        scale = ctx.scale
        out = grad.new_zeros(ctx.shape)
        for axis, difference in ctx.differences:
            weighted = difference * (2 * grad / (difference.numel() / difference.shape[1]))
            later, earlier = [slice(None)] * out.dim(), [slice(None)] * out.dim()
            later[2 + axis], earlier[2 + axis] = slice(1, None), slice(None, -1)
            out[tuple(later)] += weighted    # d/du[i] of (u[i] - u[i-1])^2 and (u[i+1] - u[i])^2
            out[tuple(earlier)] -= weighted
        return (out if scale is None else out * scale), None


def warp_voxels(image: Tensor, displacement: Tensor) -> Tensor:
    """``image`` (``[1, 1, *grid]``) sampled at every node of its grid plus ``displacement`` (``[1, d, *grid]``, in
    voxels of that grid), linear, zero outside: field IO's warp of an image by its unknowns.

    The function ``losses.warp(image, identity + displacement / voxel_scale, zero_outside=True)`` computes; for
    3-D float32 tensors on the CPU (an image that needs no gradient) it runs on the compiled kernel
    (``_linear.warp_voxels``), one pass forward and one backward, without the CUBE points, their scaling and the
    padded copy of the image that expression makes every step (figures: ``benchmarks/ACCURACY.md``, run 26).
    Only float rounding differs.
    """
    if _voxel_warp_applies(image, displacement):
        return _VoxelWarp.apply(image, displacement)
    shape = tuple(image.shape[2:])
    identity = cube_identity(shape, device=displacement.device, dtype=displacement.dtype)
    return losses.warp(image, identity + displacement / voxel_scale(shape, displacement), zero_outside=True)


def _voxel_warp_applies(image: Tensor, displacement: Tensor) -> bool:
    return (native_sampling_on()
            and image.dim() == 5 and tuple(image.shape[:2]) == (1, 1)
            and tuple(displacement.shape) == (1, 3, *image.shape[2:])
            and image.dtype == displacement.dtype == torch.float32
            and image.device.type == displacement.device.type == "cpu" and not image.requires_grad)


class _VoxelWarp(torch.autograd.Function):
    """:func:`warp_voxels` on the compiled kernel; the image is a constant (no gradient)."""

    @staticmethod
    def _run(which: int, image: Tensor, v: Tensor, g: Optional[Tensor], out: Tensor) -> Tensor:
        depth, height, width = image.shape[2:]
        n = depth * height * width
        run_pieces(NATIVE.warp_voxels, [(which, image.data_ptr(), v.data_ptr(), 0 if g is None else g.data_ptr(),
                                         out.data_ptr(), depth, height, width, start, end)
                                        for start, end in thread_ranges(n, 1, MIN_NATIVE_POINTS_PER_THREAD)])
        return out  # every tensor above stays referenced until the calls return

    @staticmethod
    def forward(ctx, image: Tensor, displacement: Tensor) -> Tensor:
        image, v = image.detach().contiguous(), displacement.detach().contiguous()
        ctx.save_for_backward(image, v)
        return _VoxelWarp._run(0, image, v, None, torch.empty_like(image))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[None, Tensor]:
        image, v = ctx.saved_tensors
        return None, _VoxelWarp._run(1, image, v, grad.contiguous().float(), torch.empty_like(v))


def inverse_consistency_penalty(disp_AB: Tensor, disp_BA: Tensor, identity: Tensor) -> Tensor:
    """``mean |phi_BA(phi_AB(x)) - x|^2 + mean |phi_AB(phi_BA(x)) - x|^2`` in network voxels squared,
    over every grid point ``x`` (on every 2nd voxel only it was a little faster and folded several times
    more voxels: ``benchmarks/README.md``, "Design figures")."""
    return _round_trip(disp_AB, disp_BA, identity) + _round_trip(disp_BA, disp_AB, identity)


def _round_trip(first: Tensor, second: Tensor, identity: Tensor) -> Tensor:
    """``mean |phi_second(phi_first(x)) - x|^2`` in network voxels squared, over every grid point ``x``."""
    composed = first + sample_cube_field(second, identity + first)
    return (composed * voxel_scale(first.shape[2:], first)).pow(2).sum(1).mean()


def alternating_inverse_consistency(disp_AB: Tensor, disp_BA: Tensor, identity: Tensor, step: int) -> Tensor:
    """:func:`inverse_consistency_penalty` one composition at a time: ``2 mean |phi_AB(phi_BA(x)) - x|^2`` on odd
    ``step`` numbers, ``2 mean |phi_BA(phi_AB(x)) - x|^2`` on even ones (so a level of an even number of steps
    ends with the forward map composed first), and two consecutive steps add the whole penalty. A step then
    samples one 3-channel field instead of two, about a fifth of a field-IO step; the Dice, folding and SDlogJ
    of the default refinement stay those of the full penalty (``benchmarks/ACCURACY.md``, run 17)."""
    first, second = _in_turn(disp_AB, disp_BA, step)
    return 2 * _round_trip(first, second, identity)


def _in_turn(disp_AB: Tensor, disp_BA: Tensor, step: int) -> Tuple[Tensor, Tensor]:
    """The composition of ``step`` (:func:`alternating_inverse_consistency`): ``(first, second)``."""
    return (disp_AB, disp_BA) if step % 2 == 0 else (disp_BA, disp_AB)


def round_trip_voxels(first: Tensor, second: Tensor) -> Tensor:
    """``mean |a(p) + b(p + a(p))|^2`` over the nodes ``p`` of the grid, in voxels squared, for ``a = first`` and
    ``b = second``, displacements in voxels (``[1, d, *grid]``), ``b`` linear between nodes with border values
    outside: :func:`_round_trip` of the same maps in CUBE units. For 3-D float32 tensors on the CPU it runs on the
    compiled kernel (``_linear.round_trip``: the composition, its squared length and their gradients in one pass
    each way, the gradient for ``b`` summed over one buffer per thread); only float rounding differs."""
    if _round_trip_applies(first, second):
        return _RoundTrip.apply(first, second)
    shape = tuple(first.shape[2:])
    scale = voxel_scale(shape, first)
    return _round_trip(first / scale, second / scale, cube_identity(shape, device=first.device, dtype=first.dtype))


def alternating_round_trip(disp_AB: Tensor, disp_BA: Tensor, step: int) -> Tensor:
    """:func:`alternating_inverse_consistency` of displacements in voxels (:func:`round_trip_voxels`): what field IO
    computes."""
    first, second = _in_turn(disp_AB, disp_BA, step)
    return 2 * round_trip_voxels(first, second)


def _round_trip_applies(first: Tensor, second: Tensor) -> bool:
    return (native_sampling_on() and first.dim() == 5 and tuple(first.shape[:2]) == (1, 3)
            and first.shape == second.shape and min(first.shape[2:]) >= 2
            and first.dtype == second.dtype == torch.float32 and first.device.type == second.device.type == "cpu")


class _RoundTrip(torch.autograd.Function):
    """:func:`round_trip_voxels` on the compiled kernel."""

    @staticmethod
    def _run(which: int, a: Tensor, b: Tensor, g: float = 0.0):
        depth, height, width = a.shape[2:]
        n = depth * height * width
        ranges = thread_ranges(n, 1, MIN_NATIVE_POINTS_PER_THREAD)
        sums = torch.zeros(len(ranges), dtype=torch.float64)
        grad_a = torch.empty_like(a) if which == 1 else None
        buffers = [torch.zeros_like(b) for _ in ranges] if which == 1 else []
        run_pieces(NATIVE.round_trip, [
            (which, a.data_ptr(), b.data_ptr(), 0 if grad_a is None else grad_a.data_ptr(),
             buffers[k].data_ptr() if buffers else 0, sums[k:].data_ptr(), g, depth, height, width, start, end)
            for k, (start, end) in enumerate(ranges)])  # every tensor above stays referenced until the calls return
        if which == 0:
            return float(sums.sum()) / n
        grad_b = buffers[0]
        for partial in buffers[1:]:
            grad_b += partial
        return grad_a, grad_b

    @staticmethod
    def forward(ctx, first: Tensor, second: Tensor) -> Tensor:
        a, b = first.detach().contiguous(), second.detach().contiguous()
        ctx.save_for_backward(a, b)
        return first.new_tensor(_RoundTrip._run(0, a, b))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        n = a[0, 0].numel()
        return _RoundTrip._run(1, a, b, float(grad) * 2.0 / n)


class FieldAdam:
    """Adam (Kingma and Ba, 2015) with ``torch.optim.Adam``'s defaults (betas 0.9 and 0.999, eps 1e-8, no weight
    decay) and the float operations of its single-tensor path, the one it takes for CPU tensors, in the same
    order: on the CPU each step leaves the same bits. Written out for field IO because the first
    ``torch.optim`` optimizer of a process imports ``torch._dynamo``, about 0.9 s of every ``gradicon register``
    on 2 cores. Tensors whose gradient is ``None`` are left as they are."""

    def __init__(self, tensors: List[Tensor], *, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.tensors, self.lr, self.betas, self.eps = list(tensors), float(lr), betas, eps
        self.exp_avg = [torch.zeros_like(t, memory_format=torch.preserve_format) for t in self.tensors]
        self.exp_avg_sq = [torch.zeros_like(t, memory_format=torch.preserve_format) for t in self.tensors]
        self.steps = [0.0] * len(self.tensors)

    def zero_grad(self) -> None:
        for tensor in self.tensors:
            tensor.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, tensor in enumerate(self.tensors):
            grad = tensor.grad
            if grad is None:
                continue
            self.steps[i] += 1.0
            step = self.steps[i]
            exp_avg, exp_avg_sq = self.exp_avg[i], self.exp_avg_sq[i]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1 ** step)
            denominator = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.eps)
            tensor.addcdiv_(exp_avg, denominator, value=-step_size)


@dataclass(frozen=True)
class FieldSettings:
    """How ``field`` IO runs, besides its steps and learning rate.

    Attributes:
        smoothness: weight of the diffusion penalty (:func:`diffusion_penalty`).
        coarse_steps: the first this many steps run on the network grid halved along every axis.
        patience: a level ends once its loss has not improved in this many steps (0: never).
        coarse_lr_factor: the coarse steps' learning rate as a multiple of ``lr``.
    """

    smoothness: float = DEFAULT_SMOOTHNESS
    coarse_steps: int = 0
    patience: int = 0
    coarse_lr_factor: float = 1.0


def refine_fields(disp_AB: Tensor, disp_BA: Optional[Tensor], image_A: Tensor, image_B: Tensor, *,
                  steps: int, lr: float, similarity, settings: FieldSettings = FieldSettings(),
                  guidance: losses.Guidance = losses.NO_GUIDANCE, progress: Progress = None,
                  history: Optional[List[Dict[str, float]]] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Adam steps on the predicted displacements; returns the refined ``(disp_AB, disp_BA)``.

    ``lr`` is in voxels of the level's grid per step (on the half-resolution grid times the settings'
    ``coarse_lr_factor``).
    ``disp_AB`` maps the grid of ``B`` into ``A`` (``A o phi_AB`` resembles ``B``). With ``disp_BA``
    both directions are refined together and kept inverse-consistent; with ``None`` only ``disp_AB``
    (no inverse-consistency term). Deterministic: no random sample points.

    ``settings`` (:class:`FieldSettings`): the smoothness, the coarse steps and the patience.

    Coarse to fine: with ``coarse_steps > 0``, the first ``coarse_steps`` of the ``steps`` run on the
    network grid halved along every axis (images and labels blurred, then sampled; fields sampled; a
    step costs about an eighth), the rest on the full grid from the upsampled result. With
    ``patience > 0`` a level ends early once its total loss has not improved by 0.1 % of its starting
    value in ``patience`` steps, but not before half of its steps have run (the progress then jumps to
    the level's end).
    """
    history = [] if history is None else history
    smoothness, coarse_steps, patience = settings.smoothness, settings.coarse_steps, settings.patience
    fields = [disp_AB.detach()] + ([disp_BA.detach()] if disp_BA is not None else [])
    levels = [(2, min(coarse_steps, steps)), (1, steps - min(coarse_steps, steps))] if coarse_steps > 0 \
        else [(1, steps)]
    shape = tuple(image_A.shape[2:])
    start = time.perf_counter()
    done = 0
    one_A = one_B = valid = None
    dice_weight = guidance.dice_weight
    if dice_weight > 0:
        one_A, one_B, valid = losses.shared_one_hot(guidance.seg_A, guidance.seg_B)
    for shrink, level_steps in levels:
        if level_steps <= 0:
            continue
        level_shape = tuple(max(2, (n - 1) // shrink + 1) for n in shape) if shrink > 1 else shape
        name = "" if len(levels) == 1 else ("half resolution" if shrink > 1 else "full resolution")

        def on(tensor: Optional[Tensor], blur: bool = True) -> Optional[Tensor]:
            """``tensor`` (full network grid) on this level's grid; ``None`` stays ``None``."""
            if tensor is None or level_shape == shape:
                return tensor
            return _resample_cube(tensor, level_shape, blur=blur)

        level = _FieldLevel(image_A=on(image_A), image_B=on(image_B), mask_A=on(guidance.mask_A, blur=False),
                            mask_B=on(guidance.mask_B, blur=False), one_A=on(one_A), one_B=on(one_B), valid=valid)
        fields = [on(f, blur=False) for f in fields]  # every level starts from fields on the full grid
        level_lr = lr * settings.coarse_lr_factor if shrink > 1 else lr
        fields, ran = level.optimise(fields, steps=level_steps, lr=level_lr, similarity=similarity,
                                     smoothness=smoothness, dice_weight=dice_weight, patience=patience,
                                     report=lambda record, k: _report(record, done + k, steps, start, progress,
                                                                      history, name))
        done += level_steps
        if ran < level_steps and progress is not None:  # stopped early: the progress jumps to the level's end
            progress(IOProgress(done, steps, history[-1], time.perf_counter() - start, name))
        if level_shape != shape:
            fields = [_resample_cube(f, shape, blur=False) for f in fields]
    return fields[0], (fields[1] if len(fields) == 2 else None)


def _resample_cube(tensor: Tensor, shape, *, blur: bool) -> Tensor:
    """``tensor`` (``[B, C, *grid]``, CUBE grid) on a CUBE grid of ``shape``: the same CUBE coordinates
    (``align_corners=True``), linear; ``blur`` first smooths with sigma = half the shrink factor."""
    if blur:
        factor = max(n / m for n, m in zip(tensor.shape[2:], shape))
        tensor = losses.gaussian_blur(tensor, sigma=factor / 2)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
    return torch.nn.functional.interpolate(tensor, size=tuple(shape), mode=mode, align_corners=True)


@dataclass
class _FieldLevel:
    """One grid of field IO: the images (and optional loss masks and one-hot labels) sampled on it."""

    image_A: Tensor
    image_B: Tensor
    mask_A: Optional[Tensor] = None
    mask_B: Optional[Tensor] = None
    one_A: Optional[Tensor] = None
    one_B: Optional[Tensor] = None
    valid: Optional[Tensor] = None

    def optimise(self, fields: List[Tensor], *, steps: int, lr: float, similarity, smoothness: float,
                 dice_weight: float, patience: int, report: Callable[[Dict[str, float], int], None]
                 ) -> Tuple[List[Tensor], int]:
        """Adam steps on ``fields`` (CUBE displacements on this level's grid); returns the result and the
        number of steps run (fewer than ``steps`` when ``patience`` stopped it)."""
        shape = tuple(self.image_A.shape[2:])
        identity = cube_identity(shape, device=self.image_A.device, dtype=fields[0].dtype)
        similarity = (losses.against(similarity, self.image_B, self.mask_B),
                      losses.against(similarity, self.image_A, self.mask_A))
        scale = voxel_scale(shape, fields[0])
        # the unknowns are in network voxels, so that ``lr`` means the same for every network size
        voxels = [(f.detach() * scale).clone().requires_grad_(True) for f in fields]
        optimizer = FieldAdam(voxels, lr=lr)
        best, since_best, first = float("inf"), 0, None
        step = 0
        for step in range(1, steps + 1):
            optimizer.zero_grad()
            total, record = self._objective(voxels, scale, identity, similarity, smoothness, dice_weight, step)
            total.backward()
            optimizer.step()
            report(record, step)
            if patience > 0:
                first = record["total"] if first is None else first
                if record["total"] < best - 1e-3 * abs(first):
                    best, since_best = record["total"], 0
                else:
                    since_best += 1
                if since_best >= patience and step >= steps // 2:  # never in the first half: a start from
                    break                                          # the pre-alignment rises before it falls
        return [(v / scale).detach() for v in voxels], step

    def _objective(self, voxels: List[Tensor], scale: Tensor, identity: Tensor,
                   similarity: Tuple[Callable[[Tensor], Tensor], ...], smoothness: float, dice_weight: float,
                   step: int) -> Tuple[Tensor, Dict[str, float]]:
        """The loss of the unknowns ``voxels`` (displacements in this grid's voxels; ``scale``: to CUBE units), every
        term computed from them as they are (:func:`warp_voxels`, :func:`diffusion_penalty_voxels`,
        :func:`alternating_round_trip`); the label maps of a Dice term are warped through the CUBE maps."""
        image_A, image_B = self.image_A, self.image_B
        v_AB = voxels[0]
        to_B, to_A = similarity
        sim = to_B(warp_voxels(image_A, v_AB))
        reg = diffusion_penalty_voxels(v_AB)
        dice = image_A.new_zeros(())
        if self.one_A is not None:
            dice = losses.soft_dice_loss(losses.warp(self.one_A, identity + v_AB / scale, zero_outside=False),
                                         self.one_B, self.valid)
        consistency = image_A.new_zeros(())
        if len(voxels) == 2:
            v_BA = voxels[1]
            sim = sim + to_A(warp_voxels(image_B, v_BA))
            reg = reg + diffusion_penalty_voxels(v_BA)
            if self.one_A is not None:
                dice = dice + losses.soft_dice_loss(losses.warp(self.one_B, identity + v_BA / scale,
                                                                zero_outside=False), self.one_A, self.valid)
            consistency = alternating_round_trip(v_AB, v_BA, step)
        total = sim + smoothness * reg + INVERSE_CONSISTENCY * consistency + dice_weight * dice
        record = {"total": float(total.detach()), "similarity": float(sim.detach()),
                  "regularizer": float(reg.detach()), "inverse_consistency": float(consistency.detach()),
                  "dice": float(dice.detach())}
        return total, record


def _report(record: Dict[str, float], step: int, steps: int, start: float, progress: Progress,
            history: List[Dict[str, float]], level: str = "") -> None:
    history.append(record)
    if progress is not None:
        progress(IOProgress(step, steps, record, time.perf_counter() - start, level))
