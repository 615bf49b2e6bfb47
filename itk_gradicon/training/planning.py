"""The composite set and its pair plan: which pair (or M2M cycle) each global index stands for, drawn from
the run's seed alone (:mod:`itk_gradicon.training.seeds`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..model_records import Domain
from .config import TrainConfig
from .listing import Member, SyntheticMember, member_where
from .seeds import PURPOSE_EPOCH, PURPOSE_PAIR, random_stream

_MAX_TRIES = 200


@dataclass(frozen=True)
class PairPlan:
    """What one training sample holds: which image plays which role, and which share a transform.

    Attributes:
        member: index of the member in the composite set.
        images: role -> image index in the member (``A``, ``A_loss``, ``B``, ``B_loss``; or ``S``,
            ``T``, ``Sp``, ``Tp`` in an M2M cycle).
        views: role -> view label; roles with one label are co-registered and get one augmentation.
        anchor: the role laid out in the reference layout (the others follow its axes).
        prealigned: M2M: whether ``Sp``, ``Tp`` is a pre-aligned bridge pair.
    """

    member: int
    images: Tuple[Tuple[str, int], ...]
    views: Tuple[Tuple[str, str], ...]
    anchor: str
    prealigned: bool = False

    def image(self, role: str) -> int:
        return dict(self.images)[role]


class CompositeSet:
    """The members, their sampling shares, and the deterministic pair plan.

    Args:
        members: checked members (weight 0 ones included; they are never drawn).
        train: the configuration (sampling, objective, seed).
    """

    def __init__(self, members: Sequence[Member], train: TrainConfig) -> None:
        self.members = list(members)
        self.sampling = train.sampling
        self.objective = train.objective
        self.seed = int(train.seed)
        weights = np.array([m.config.weight for m in self.members], dtype=np.float64)
        mode = self.sampling.mode
        if mode == "per_dataset":
            counts = np.array([int(round(self.sampling.pairs_per_dataset * w)) if w > 0 else 0 for w in weights])
            counts[(weights > 0) & (counts == 0)] = 1
            self.counts: Optional[np.ndarray] = counts
            self.pairs_per_epoch = int(counts.sum())
            self.shares = counts / counts.sum()
        else:
            if mode == "weighted":
                keys = [(m.modalities, m.config.region) for m in self.members]
            else:
                keys = [m.config.region for m in self.members]
            active = [k for k, w in zip(keys, weights) if w > 0]
            share = np.array([w / active.count(k) if w > 0 else 0.0 for k, w in zip(keys, weights)])
            self.counts = None
            self.pairs_per_epoch = int(self.sampling.pairs_per_epoch)
            self.shares = share / share.sum()
        self._epoch_cache: "OrderedDict[int, np.ndarray]" = OrderedDict()

    # ---- epochs -------------------------------------------------------------------------------
    def epoch_members(self, epoch: int) -> np.ndarray:
        """The member of every pair of ``epoch``, in order (a function of the seed and the epoch)."""
        cached = self._epoch_cache.get(epoch)
        if cached is not None:
            return cached
        rng = random_stream(self.seed, PURPOSE_EPOCH, epoch)
        if self.counts is not None:
            order = np.repeat(np.arange(len(self.members)), self.counts)
            rng.shuffle(order)
        else:
            order = rng.choice(len(self.members), size=self.pairs_per_epoch, p=self.shares)
        if len(self._epoch_cache) >= 4:
            self._epoch_cache.popitem(last=False)
        self._epoch_cache[epoch] = order
        return order

    def plan(self, index: int) -> PairPlan:
        """The sample of global pair index ``index``."""
        epoch, position = divmod(int(index), self.pairs_per_epoch)
        member_index = int(self.epoch_members(epoch)[position])
        rng = random_stream(self.seed, PURPOSE_PAIR, index)
        member = self.members[member_index]
        if isinstance(member, SyntheticMember):
            return draw_synthetic_pair(member, member_index, rng)
        if self.objective.kind == "m2m":
            prealigned = bool(rng.random() < self.objective.prealigned_bridges)
            return draw_cycle(member, member_index, rng, prealigned=prealigned)
        return draw_pair(member, member_index, rng, self.objective.loss_randomisation)

    def epochs_to_steps(self, epochs: float, global_batch: int) -> int:
        """Optimiser steps that draw ``epochs`` epochs of pairs with ``global_batch`` pairs per step."""
        return max(1, int(np.ceil(epochs * self.pairs_per_epoch / global_batch)))

    def domain(self) -> Domain:
        """What a model trained on this set has seen (recorded in its file, checked at registration): the
        members' regions (those named), the intensity kinds of their images (synthetic images count as
        MRI), and the smallest and largest physical extent of any image axis (mm). Members of weight 0
        are never drawn and do not count."""
        members = [m for m in self.members if m.config.weight > 0]
        regions = sorted({m.config.region for m in members} - {"unspecified"})
        kinds, extents = set(), []
        for member in members:
            if isinstance(member, SyntheticMember):
                kinds.add("mri")
                grids = [entry.grid for entry in member.label_maps]
            else:
                kinds.update(entry.normalization.modality for entry in member.entries)
                grids = [entry.grid for entry in member.entries]
            extents += [n * sp for grid in grids for n, sp in zip(grid.size, grid.spacing)]
        extent = (round(float(min(extents)), 1), round(float(max(extents)), 1)) if extents else None
        return Domain(", ".join(regions), tuple(sorted(kinds)), extent)

    def describe(self) -> List[str]:
        """One line per member: images, subjects, views, modalities, region, pairing, share of pairs."""
        lines = []
        for m, share in zip(self.members, self.shares):
            if isinstance(m, SyntheticMember):
                lines.append(f"{m.name}: {len(m.label_maps)} label maps, synthetic images, "
                             f"{m.config.region}, {m.config.pairing}-subject, segmentations; "
                             f"{100 * share:.1f}% of pairs")
                continue
            masks = f", masks ({m.mask_mode})" if m.mask_mode else ""
            segs = ", segmentations" if m.has_segmentations else ""
            lines.append(f"{m.name}: {len(m.entries)} images, {len(m.subjects)} subjects, {len(m.views)} views, "
                         f"{'/'.join(m.modalities)}, {m.config.region}, {m.config.pairing}-subject{masks}{segs}; "
                         f"{100 * share:.1f}% of pairs")
        return lines

    def provenance(self) -> List[Dict[str, Any]]:
        """What the model file records about each data set."""
        return [{"name": m.name, "images": len(m.entries), "subjects": len(m.subjects), "views": len(m.views),
                 "modalities": list(m.modalities), "region": m.config.region, "pairing": m.config.pairing,
                 "weight": m.config.weight, "share": float(share), "source": m.config.images}
                for m, share in zip(self.members, self.shares)]


def _pick(rng: np.random.Generator, items: Sequence[int]) -> int:
    return int(items[int(rng.integers(len(items)))])


def _draw_views(member: Member, rng: np.random.Generator) -> Tuple[int, int]:
    """Two views: of two different subjects (inter) or of one subject (intra), in random order."""
    if member.config.pairing == "intra":
        subject = member.intra_subjects()[int(rng.integers(len(member.intra_subjects())))]
        choices = member.views_of(subject)
        first, second = rng.choice(len(choices), size=2, replace=False)
        return choices[int(first)], choices[int(second)]
    n = len(member.views)
    first = int(rng.integers(n))
    for _ in range(_MAX_TRIES):
        second = int(rng.integers(n))
        if member.view_subject[second] != member.view_subject[first]:
            return first, second
    others = [v for v in range(n) if member.view_subject[v] != member.view_subject[first]]
    return first, _pick(rng, others)


def draw_synthetic_pair(member: SyntheticMember, member_index: int, rng: np.random.Generator) -> PairPlan:
    """Two label maps (``inter``: different ones; ``intra``: one map, deformed twice)."""
    n = len(member.label_maps)
    first = int(rng.integers(n))
    second = first
    if member.config.pairing == "inter":
        second = (first + 1 + int(rng.integers(n - 1))) % n
    return PairPlan(member_index, (("A", first), ("B", second)), (("A", "a"), ("B", "b")), anchor="B")


def draw_pair(member: Member, member_index: int, rng: np.random.Generator, randomisation: str) -> PairPlan:
    """A (uni/multi)GradICON pair with its loss images (multiGradICON's loss randomisation).

    ``B``: the similarity is computed on the network's inputs. ``R``: on an image of the same view
    as each input, drawn independently (possibly the input itself). ``F``: as ``R`` but both loss
    images of one modality, drawn among the modalities the two views share (the inputs are used when
    they share none).
    """
    view_A, view_B = _draw_views(member, rng)
    images_A, images_B = member.views[view_A], member.views[view_B]
    input_A, input_B = _pick(rng, images_A), _pick(rng, images_B)
    loss_A, loss_B = input_A, input_B
    if randomisation == "R":
        loss_A, loss_B = _pick(rng, images_A), _pick(rng, images_B)
    elif randomisation == "F":
        mods_A = {member.entries[i].modality for i in images_A}
        mods_B = {member.entries[i].modality for i in images_B}
        common = sorted(mods_A & mods_B)
        if common:
            modality = common[int(rng.integers(len(common)))]
            loss_A = _pick(rng, [i for i in images_A if member.entries[i].modality == modality])
            loss_B = _pick(rng, [i for i in images_B if member.entries[i].modality == modality])
    return PairPlan(member_index, (("A", input_A), ("A_loss", loss_A), ("B", input_B), ("B_loss", loss_B)),
                    (("A", "a"), ("A_loss", "a"), ("B", "b"), ("B_loss", "b")), anchor="B")


def m2m_roles(member: Member) -> Tuple[str, str]:
    """The (source, target) modalities of an M2M member: its two modalities in sorted order."""
    mods = member.modalities
    return mods[0], mods[1]


def draw_cycle(member: Member, member_index: int, rng: np.random.Generator, *, prealigned: bool) -> PairPlan:
    """An M2M-Reg cycle ``S -> T -> S' -> T' -> S``.

    ``S``, ``S'`` have the source modality and ``T``, ``T'`` the target modality. Every registered
    pair ``(S, T)``, ``(T, S')``, ``(S', T')``, ``(T', S)`` joins two different subjects, and
    ``S' != S``, ``T' != T`` (the paper's protocol); a pre-aligned bridge ``(S', T')`` is instead two
    images of one view (one subject, co-registered).

    Raises:
        ConfigError: no such cycle can be drawn from the member's images.
    """
    source, target = m2m_roles(member)
    entries = member.entries
    of = {m: [i for i, e in enumerate(entries) if e.modality == m] for m in (source, target)}
    subj = lambda i: entries[i].subject  # noqa: E731
    bridges = []
    if prealigned:
        for view in member.views:
            s_list = [i for i in view if entries[i].modality == source]
            t_list = [i for i in view if entries[i].modality == target]
            if s_list and t_list:
                bridges.append((s_list, t_list))
        if not bridges:
            raise ConfigError(f"{member_where(member.index, member.config)}: prealigned_bridges needs a group holding "
                              f"a {source} and a {target} image of one subject (CSV column 'group')")
    for _ in range(_MAX_TRIES):
        if prealigned:
            s_list, t_list = bridges[int(rng.integers(len(bridges)))]
            sp, tp = _pick(rng, s_list), _pick(rng, t_list)
            s_candidates = [i for i in of[source] if subj(i) != subj(sp)]
            if not s_candidates:
                continue
            s = _pick(rng, s_candidates)
            t_candidates = [i for i in of[target] if subj(i) not in (subj(s), subj(sp))]
            if not t_candidates:
                continue
            t = _pick(rng, t_candidates)
            views = (("S", "s"), ("T", "t"), ("Sp", "bridge"), ("Tp", "bridge"))
        else:
            s = _pick(rng, of[source])
            t_candidates = [i for i in of[target] if subj(i) != subj(s)]
            if not t_candidates:
                continue
            t = _pick(rng, t_candidates)
            sp_candidates = [i for i in of[source] if subj(i) != subj(t) and i != s]
            if not sp_candidates:
                continue
            sp = _pick(rng, sp_candidates)
            tp_candidates = [i for i in of[target] if subj(i) not in (subj(sp), subj(s)) and i != t]
            if not tp_candidates:
                continue
            tp = _pick(rng, tp_candidates)
            views = (("S", "s"), ("T", "t"), ("Sp", "sp"), ("Tp", "tp"))
        return PairPlan(member_index, (("S", s), ("T", t), ("Sp", sp), ("Tp", tp)), views, anchor="T",
                        prealigned=prealigned)
    raise ConfigError(f"{member_where(member.index, member.config)}: no M2M cycle can be formed: it needs "
                      f"{source} and {target} images of at least three subjects, so that every registered "
                      "pair joins two different subjects")


def check_composite(composite: CompositeSet, train: TrainConfig) -> List[str]:
    """Checks that need the whole set; returns notes for the user, raises :class:`ConfigError`."""
    notes: List[str] = []
    objective = train.objective
    active = [m for m in composite.members if m.config.weight > 0]
    synthetic = [m for m in active if isinstance(m, SyntheticMember)]
    if synthetic and objective.kind == "m2m":
        raise ConfigError(f"{member_where(synthetic[0].index, synthetic[0].config)}: synthetic data sets train "
                          "objective kind: gradicon; M2M-Reg needs real multi-modal subjects")
    if objective.kind == "m2m":
        for m in active:
            if len(m.modalities) != 2:
                raise ConfigError(f"{member_where(m.index, m.config)}: an M2M-Reg data set needs exactly two "
                                  f"modalities (source and target), found {len(m.modalities)}: "
                                  f"{', '.join(m.modalities)}")
            rng = random_stream(train.seed, 99, m.index)
            draw_cycle(m, m.index, rng, prealigned=False)
            if objective.prealigned_bridges > 0:
                draw_cycle(m, m.index, rng, prealigned=True)
    elif objective.loss_randomisation != "B" and not any(len(v) > 1 for m in active for v in m.views):
        notes.append(f"loss_randomisation {objective.loss_randomisation}: no data set has groups of "
                     "co-registered images, so the similarity always uses the network's inputs (as B)")
    if objective.dice_weight > 0 and not any(m.has_segmentations for m in active):
        raise ConfigError("objective.dice_weight: a Dice term needs segmentations, but no data set with "
                          "weight > 0 has any (CSV column 'segmentation' or segmentation_template)")
    if train.augmentation.invert_ct > 0 and not any(e.normalization.modality == "ct"
                                                    for m in active for e in m.entries):
        notes.append("augmentation.invert_ct: no CT image in the data sets, so nothing is inverted")
    return notes
