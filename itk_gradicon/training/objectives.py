"""Training objectives: (uni/multi)GradICON with loss randomisation, and M2M-Reg's cycle.

Both are :class:`torch.nn.Module` wrappers around the registration network, so that one call runs
every network evaluation of a step and returns every loss term; :class:`DistributedDataParallel`
wraps the objective as a whole. Maps follow :mod:`itk_gradicon.network.operators`: ``net(X, Y)`` is
``phi_XY``, which maps points of ``Y``'s grid to ``X``; ``X o phi_XY`` is ``X`` warped onto ``Y``.

GradICON / uniGradICON / multiGradICON (:class:`GradICONObjective`)::

    sim(A_L o phi_AB, B_L) + sim(B_L o phi_BA, A_L) + lambda * GradICON(phi_AB, phi_BA)
        + dice_weight * (Dice(segA o phi_AB, segB) + Dice(segB o phi_BA, segA))

where ``(A_L, B_L)`` are the loss images (the inputs ``(A, B)`` for variant B, co-registered images
of the same views for the randomised variants F and R; see :func:`.data.draw_pair`). It is
:func:`itk_gradicon.pipeline.losses.gradicon_objective` plus a Dice term restricted to the pairs that have
segmentations.

M2M-Reg (:class:`M2MObjective`, paper eq. 2, 3, 6), with ``Phi^XY = net(X, Y)``::

    L_m2m = sim(S o Phi^ST o Phi^TS', S') + sim(S' o Phi^S'T' o Phi^T'S, S)
          + sim(T o Phi^TS' o Phi^S'T', T') + sim(T' o Phi^T'S o Phi^ST, T)
    L_gcc = || grad(Phi^ST o Phi^TS' o Phi^S'T' o Phi^T'S) - I ||^2      (GradCyCon)
    L     = L_m2m + lambda * GradICON(Phi^ST, Phi^TS) + lambda_gcc * L_gcc

Only images of one modality are compared. With a pre-aligned bridge pair ``(S', T')``, ``Phi^S'T'``
is the identity and is left out of both ``L_m2m`` and ``L_gcc`` (semi-supervised M2M-Reg).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..network.operators import CubeMap
from ..pipeline import losses

Tensor = torch.Tensor


def dice_stride(shape, dice_grid: int) -> int:
    """The smallest stride that brings every axis of ``shape`` to at most ``dice_grid`` nodes (0: 1)."""
    if dice_grid <= 0:
        return 1
    stride = 1
    while any(-(-int(n) // stride) > dice_grid for n in shape):
        stride += 1
    return stride


def dice_term(seg_A: Tensor, seg_B: Tensor, has_seg: Tensor, phi_AB: CubeMap, phi_BA: CubeMap,
              dice_grid: int = 0) -> Tensor:
    """Symmetric soft Dice loss over the pairs whose ``has_seg`` is true (0 when there are none).

    Labels are compared as one-hot maps of the labels both images of a pair contain
    (:func:`itk_gradicon.pipeline.losses.shared_one_hot`); the warped maps are linearly interpolated.

    Args:
        seg_A, seg_B: label maps ``[N, 1, *shape]`` on the network grid.
        has_seg: ``[N]`` booleans.
        phi_AB, phi_BA: the network's maps for the batch.
        dice_grid: compute the term on every ``k``-th node of the network grid, ``k`` the smallest
            stride that leaves at most ``dice_grid`` nodes per axis (0: every node). One-hot maps of
            many labels make the term the most expensive part of a step: 48 on a 96^3 grid costs 1/8.

    Returns:
        ``Dice(seg_A o phi_AB, seg_B) + Dice(seg_B o phi_BA, seg_A)``, averaged over those pairs.
    """
    index = torch.nonzero(has_seg.reshape(-1), as_tuple=False).reshape(-1)
    zero = seg_A.new_zeros(())
    if index.numel() == 0:
        return zero
    stride = dice_stride(seg_A.shape[2:], dice_grid)
    if stride > 1:
        every = (slice(None), slice(None)) + (slice(None, None, stride),) * (seg_A.dim() - 2)
        seg_A, seg_B = seg_A[every], seg_B[every]
    shape = seg_A.shape[2:]
    try:
        one_A, one_B, valid = losses.shared_one_hot(seg_A[index], seg_B[index])
    except ValueError:  # no label common to both images of any pair
        return zero
    grid_AB = phi_AB.on_grid(shape)[index]
    grid_BA = phi_BA.on_grid(shape)[index]
    return (losses.soft_dice_loss(losses.warp(one_A, grid_AB, zero_outside=False), one_B, valid)
            + losses.soft_dice_loss(losses.warp(one_B, grid_BA, zero_outside=False), one_A, valid))


def _loss_mask(batch: Dict[str, Tensor], role: str) -> Optional[Tensor]:
    """The loss mask of ``role``, or ``None`` when no pair of the batch has loss masks."""
    has_mask = batch.get("has_mask")
    if has_mask is None or not bool(torch.as_tensor(has_mask).any()):
        return None
    return batch[f"mask_{role}"]


class GradICONObjective(nn.Module):
    """The (uni/multi)GradICON training loss for a batch (see the module docstring).

    Args:
        network: registration network ``(A, B) -> CubeMap``.
        similarity: ``(warped, target, mask) -> loss``, e.g. :func:`itk_gradicon.pipeline.losses.lncc_loss`.
        lmbda: GradICON weight (1.5 in the papers).
        dice_weight: weight of the Dice term (0: none).

    Example:
        >>> objective = GradICONObjective(net, losses.squared_lncc_loss)     # doctest: +SKIP
        >>> terms = objective(batch, points)
        >>> terms["total"].backward()
    """

    def __init__(self, network: nn.Module, similarity: Callable[..., Tensor], *,
                 lmbda: float = losses.GRADICON_LAMBDA, dice_weight: float = 0.0, dice_grid: int = 0) -> None:
        super().__init__()
        self.network = network
        self.similarity = similarity
        self.lmbda = float(lmbda)
        self.dice_weight = float(dice_weight)
        self.dice_grid = int(dice_grid)

    def forward(self, batch: Dict[str, Tensor], points: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Loss terms of a batch: ``total``, ``similarity``, ``gradicon``, ``dice``.

        Args:
            batch: ``image_A``, ``image_B`` and optionally ``loss_A``, ``loss_B``, ``mask_A``,
                ``mask_B``, ``has_mask``, ``seg_A``, ``seg_B``, ``has_seg`` (see :class:`.data.PairDataset`).
            points: GradICON sample points (default: drawn with ``generator``).
        """
        image_A, image_B = batch["image_A"], batch["image_B"]
        terms = losses.gradicon_objective(
            self.network, image_A, image_B, similarity=self.similarity, lmbda=self.lmbda,
            guidance=losses.Guidance(mask_A=_loss_mask(batch, "A"), mask_B=_loss_mask(batch, "B")),
            loss_A=batch.get("loss_A"), loss_B=batch.get("loss_B"), points=points, generator=generator)
        dice = image_A.new_zeros(())
        if self.dice_weight > 0 and "seg_A" in batch:
            dice = dice_term(batch["seg_A"], batch["seg_B"], batch["has_seg"], terms.phi_AB, terms.phi_BA,
                             self.dice_grid)
        return {"total": terms.total + self.dice_weight * dice, "similarity": terms.similarity,
                "gradicon": terms.regularizer, "dice": dice}


class M2MObjective(nn.Module):
    """M2M-Reg's cyclic objective for a batch of cycles (see the module docstring).

    A batch may mix unsupervised and pre-aligned cycles (``batch["prealigned"]``); each kind is
    evaluated on its own and the terms are averaged with the number of cycles of each kind as weights.

    Args:
        network: registration network ``(A, B) -> CubeMap``.
        similarity: mono-modal similarity ``(warped, target, mask) -> loss`` (LNCC in the paper).
        lmbda: weight of GradICON on ``(Phi^ST, Phi^TS)`` (paper: 0.5).
        lambda_gcc: weight of GradCyCon (paper: 0.1).
        dice_weight: weight of a Dice term on ``(S, T)`` (0: none).
    """

    def __init__(self, network: nn.Module, similarity: Callable[..., Tensor], *, lmbda: float = 0.5,
                 lambda_gcc: float = 0.1, dice_weight: float = 0.0, dice_grid: int = 0) -> None:
        super().__init__()
        self.network = network
        self.similarity = similarity
        self.lmbda = float(lmbda)
        self.lambda_gcc = float(lambda_gcc)
        self.dice_weight = float(dice_weight)
        self.dice_grid = int(dice_grid)

    def forward(self, batch: Dict[str, Tensor], points: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Loss terms: ``total``, ``similarity`` (L_m2m), ``gradicon``, ``gradcycon``, ``dice``.

        Args:
            batch: ``image_S``, ``image_T``, ``image_Sp``, ``image_Tp``, optionally ``prealigned``
                (``[N]`` booleans), ``mask_*``, ``has_mask``, ``seg_S``, ``seg_T``, ``has_seg``.
            points: sample points of GradICON and GradCyCon (default: drawn with ``generator``).
        """
        S = batch["image_S"]
        n = S.shape[0]
        if points is None:
            points = losses.gradicon_sample_points(S.shape[2:], like=S, generator=generator)
        prealigned = batch.get("prealigned")
        if prealigned is None:
            prealigned = torch.zeros(n, dtype=torch.bool)
        prealigned = torch.as_tensor(prealigned).reshape(-1).bool()
        totals: Dict[str, Tensor] = {}
        for flag in (False, True):
            index = torch.nonzero(prealigned == flag, as_tuple=False).reshape(-1)
            if index.numel() == 0:
                continue
            part = batch if index.numel() == n else _subset(batch, index.to(S.device))
            terms = self._cycle(part, points, prealigned=flag)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value * (index.numel() / n)
        return totals

    def _cycle(self, batch: Dict[str, Tensor], points: Tensor, *, prealigned: bool) -> Dict[str, Tensor]:
        net, sim = self.network, self.similarity
        S, T, Sp, Tp = (batch[f"image_{r}"] for r in ("S", "T", "Sp", "Tp"))
        shape = S.shape[2:]

        def compare(image: Tensor, warp_map: CubeMap, target: Tensor, role: str) -> Tensor:
            warped = losses.warp(image, warp_map.on_grid(shape), zero_outside=True)
            return sim(warped, target, _loss_mask(batch, role))

        phi_ST, phi_TS = net(S, T), net(T, S)
        phi_TSp, phi_TpS = net(T, Sp), net(Tp, S)
        if prealigned:  # Phi^S'T' is the identity
            similarity = (compare(S, phi_ST.compose(phi_TSp), Sp, "Sp") + compare(Sp, phi_TpS, S, "S")
                          + compare(T, phi_TSp, Tp, "Tp") + compare(Tp, phi_TpS.compose(phi_ST), T, "T"))
            cycle = (phi_ST, phi_TSp, phi_TpS)
        else:
            phi_SpTp = net(Sp, Tp)
            similarity = (compare(S, phi_ST.compose(phi_TSp), Sp, "Sp")
                          + compare(Sp, phi_SpTp.compose(phi_TpS), S, "S")
                          + compare(T, phi_TSp.compose(phi_SpTp), Tp, "Tp")
                          + compare(Tp, phi_TpS.compose(phi_ST), T, "T"))
            cycle = (phi_ST, phi_TSp, phi_SpTp, phi_TpS)
        gradicon = losses.gradicon_regularizer(phi_ST, phi_TS, points)
        gradcycon = losses.cycle_gradient_penalty(cycle, points)
        dice = S.new_zeros(())
        if self.dice_weight > 0 and "seg_S" in batch:
            dice = dice_term(batch["seg_S"], batch["seg_T"], batch["has_seg"], phi_ST, phi_TS, self.dice_grid)
        total = similarity + self.lmbda * gradicon + self.lambda_gcc * gradcycon + self.dice_weight * dice
        return {"total": total, "similarity": similarity, "gradicon": gradicon, "gradcycon": gradcycon,
                "dice": dice}


def _subset(batch: Dict[str, Tensor], index: Tensor) -> Dict[str, Tensor]:
    """The pairs ``index`` of a batch (every per-pair tensor is indexed; anything else is kept)."""
    n = batch["image_S"].shape[0]
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value
    return out


def build_objective(kind: str, network: nn.Module, *, similarity: str, lmbda: float, dice_weight: float,
                    lambda_gcc: float = 0.1, dice_grid: int = 0) -> nn.Module:
    """The objective module of a configuration's ``objective`` section.

    Args:
        kind: ``gradicon`` or ``m2m``.
        network: the network to train.
        similarity: ``lncc``, ``lncc2`` or ``mind`` (see :data:`itk_gradicon.pipeline.losses.SIMILARITIES`).
        lmbda: GradICON weight.
        dice_weight: Dice weight.
        lambda_gcc: GradCyCon weight (``m2m``).
        dice_grid: largest grid size per axis of the Dice term (see :func:`dice_term`; 0: full grid).
    """
    sim = losses.similarity_function(similarity)
    if kind == "m2m":
        return M2MObjective(network, sim, lmbda=lmbda, lambda_gcc=lambda_gcc, dice_weight=dice_weight,
                            dice_grid=dice_grid)
    if kind == "gradicon":
        return GradICONObjective(network, sim, lmbda=lmbda, dice_weight=dice_weight, dice_grid=dice_grid)
    raise ValueError(f"unknown objective {kind!r}; allowed: gradicon, m2m")
