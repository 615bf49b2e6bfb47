"""Composite training sets: the torch ``Dataset`` of training pairs and its sampler, and the vocabulary of the
modules beside it (:mod:`.listing`, :mod:`.planning`, :mod:`.caching`, :mod:`.augmentation`, :mod:`.seeds`).

Vocabulary:

* an **entry** is one image file with its subject id, modality, optional mask and segmentation;
* a **view** is a group of co-registered images of one subject (one ``group`` of a CSV file, e.g. the
  FLAIR and T1c of one BraTS session); without groups every image is its own view;
* a **member** is one data set of the composite set; it pairs views ``inter``-subject (views of two
  different subjects) or ``intra``-subject (two views of one subject).

Pairs are a pure function of ``(seed, global pair index)``: the index picks the epoch and the
position in it, the epoch's list of members is drawn from ``(seed, epoch)``, the pair inside the member
from ``(seed, index)``, its augmentation from ``(seed, index)`` too. No random state lives in the
DataLoader workers, so any number of workers, and a run resumed at any step, see exactly the same
pairs. Distributed training shards the index stream (see :class:`StepBatchSampler`).

Every image reaches the network exactly as at registration: read and checked by
:func:`itk_gradicon.io.images.read_image`, normalised by
:class:`itk_gradicon.pipeline.preprocess.IntensityNormalization` (masked by
:func:`itk_gradicon.pipeline.preprocess.apply_input_mask` for input masking), and laid out by
:class:`itk_gradicon.spatial.frames.NetworkFrame`: the pair's target image (``B``; ``T`` in an M2M cycle)
keeps the reference layout and every other image is laid out along its axes, as
:func:`itk_gradicon.register` lays the moving image out along the fixed image's axes.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..spatial.frames import NetworkFrame, canonical_axes
from .augmentation import Augmentation, apply_augmentation, draw_augmentation  # noqa: F401  (Augmentation: re-exported)
from .caching import VolumeLoader
from .config import AugmentationConfig, SynthesisConfig
from .listing import ImageEntry, Member, SyntheticMember, read_grid, scan_member  # noqa: F401  (re-exported)
from .planning import (  # noqa: F401  (re-exported: the names users of this module know)
    CompositeSet, PairPlan, check_composite, draw_cycle, draw_pair, draw_synthetic_pair)
from .seeds import PURPOSE_AUGMENT, PURPOSE_SYNTHESIS, derived_seed, random_stream  # noqa: F401
from .synthesis import Synthesizer

GRADICON_ROLES = ("A", "A_loss", "B", "B_loss")
M2M_ROLES = ("S", "T", "Sp", "Tp")


class PairDataset(Dataset):
    """Training samples by global pair index: tensors ready for the objective.

    A ``gradicon`` sample holds ``image_A``, ``image_B`` (network inputs), ``loss_A``, ``loss_B``
    (similarity images), ``mask_A``, ``mask_B`` (loss masks, ones without masks), ``seg_A``,
    ``seg_B`` (label maps, zeros without), ``has_mask``, ``has_seg`` and ``member``. An ``m2m`` sample
    holds ``image_S``, ``image_T``, ``image_Sp``, ``image_Tp`` with their ``mask_*`` and ``seg_*``,
    ``prealigned``, ``has_mask``, ``has_seg`` and ``member``. Images are ``[1, *shape]`` float32.

    Args:
        composite: the composite set and pair plan.
        shape: the network input shape.
        augmentation: the augmentation settings.
        loader: the volume loader (disk / memory cache).
    """

    def __init__(self, composite: CompositeSet, shape: Sequence[int], augmentation: AugmentationConfig,
                 loader: VolumeLoader, *, layout: str = "reference") -> None:
        self.composite = composite
        self.shape = tuple(int(s) for s in shape)
        self.augmentation = augmentation
        self.loader = loader
        self.layout = layout
        self.m2m = composite.objective.kind == "m2m"
        self._synthesizers: Dict[int, Synthesizer] = {}

    def synthesizer(self, member_index: int) -> Synthesizer:
        """The synthesiser of a synthetic member (made once per process)."""
        found = self._synthesizers.get(member_index)
        if found is None:
            member = self.composite.members[member_index]
            settings = member.config.synthesis or SynthesisConfig()
            # label maps have no common storage order: they follow the canonical axes in either layout
            # (with the reference layout, flips and permutations vary what the network sees)
            found = Synthesizer(member.label_maps, settings, self.shape, canonical_axes(len(self.shape)),
                                memory_items=max(self.loader.memory_items, len(member.label_maps)))
            self._synthesizers[member_index] = found
        return found

    def _synthetic_sample(self, index: int, plan: PairPlan) -> Dict[str, Any]:
        pair = self.synthesizer(plan.member).pair(random_stream(self.composite.seed, PURPOSE_SYNTHESIS, index),
                                                  plan.image("A"), plan.image("B"))
        rng = random_stream(self.composite.seed, PURPOSE_AUGMENT, index)
        aug = draw_augmentation(self.augmentation, rng, self.shape, ["a", "b"], [])
        ones = torch.ones((1, *self.shape), dtype=torch.float32)
        sample: Dict[str, Any] = {"member": plan.member, "has_mask": False, "has_seg": True}
        for role, view in (("A", "a"), ("B", "b")):
            image = apply_augmentation(pair[f"image_{role}"], aug, view, nearest=False)
            sample[f"image_{role}"] = image
            sample[f"loss_{role}"] = image
            sample[f"mask_{role}"] = ones
            sample[f"seg_{role}"] = apply_augmentation(pair[f"seg_{role}"], aug, view, nearest=True)
        return sample

    def __len__(self) -> int:  # the index stream is unbounded; the sampler decides what is drawn
        return 1 << 62

    def __getitem__(self, index: int) -> Dict[str, Any]:
        plan = self.composite.plan(index)
        member = self.composite.members[plan.member]
        if isinstance(member, SyntheticMember):
            return self._synthetic_sample(index, plan)
        images = dict(plan.images)
        views = dict(plan.views)
        anchor = member.entries[images[plan.anchor]]
        anchor_frame = NetworkFrame.for_layout(self.layout, anchor.grid, self.shape)
        frames = {}
        for role, i in images.items():
            if views[role] == views[plan.anchor]:
                frames[role] = anchor_frame
            else:
                frames[role] = anchor_frame.companion(member.entries[i].grid)
        ct_roles = [r for r, i in images.items() if member.entries[i].normalization.modality == "ct"]
        # one inversion decision per image, so an input and its identical loss image stay identical
        ct_roles = sorted({r for r in ct_roles if r == _first_role(images, images[r])})
        rng = random_stream(self.composite.seed, PURPOSE_AUGMENT, index)
        aug = draw_augmentation(self.augmentation, rng, self.shape, list(views.values()), ct_roles)
        roles = M2M_ROLES if self.m2m else GRADICON_ROLES
        tensors: Dict[str, torch.Tensor] = {}
        for role in roles:
            first = _first_role(images, images[role])
            if first != role:
                tensors[role] = tensors[first]
                continue
            entry = member.entries[images[role]]
            image = self.loader.load("image", entry, frames[role], input_mask=member.input_masks)
            if role in aug.inverted:
                image = 1.0 - image
                if member.input_masks:
                    image = image * self.loader.load("mask", entry, frames[role])
            tensors[role] = apply_augmentation(image, aug, views[role], nearest=False)
        sample: Dict[str, Any] = {"member": plan.member, "has_mask": member.loss_masks,
                                  "has_seg": member.has_segmentations}
        label_roles = ("A", "B") if not self.m2m else M2M_ROLES
        zeros = torch.zeros((1, *self.shape), dtype=torch.float32)
        for role in label_roles:
            entry = member.entries[images[role]]
            if member.loss_masks:
                mask = apply_augmentation(self.loader.load("mask", entry, frames[role]), aug, views[role], nearest=True)
            else:
                mask = torch.ones_like(zeros)
            if entry.segmentation is not None:
                seg = apply_augmentation(self.loader.load("segmentation", entry, frames[role]), aug, views[role],
                                         nearest=True)
            else:
                seg = zeros
            sample[f"mask_{role}"] = mask
            sample[f"seg_{role}"] = seg
        if self.m2m:
            sample["has_seg"] = all(member.entries[images[r]].segmentation is not None for r in ("S", "T"))
            sample["prealigned"] = plan.prealigned
            for role in M2M_ROLES:
                sample[f"image_{role}"] = tensors[role]
        else:
            sample["has_seg"] = all(member.entries[images[r]].segmentation is not None for r in ("A", "B"))
            sample["image_A"], sample["image_B"] = tensors["A"], tensors["B"]
            sample["loss_A"], sample["loss_B"] = tensors["A_loss"], tensors["B_loss"]
        return sample


def _first_role(images: Mapping[str, int], image_index: int) -> str:
    """The first role (in plan order) that holds ``image_index``."""
    return next(r for r, i in images.items() if i == image_index)


class StepBatchSampler(Sampler):
    """Batches of global pair indices for one process, step by step.

    Step ``s`` of rank ``r`` (of ``world_size``) draws indices ``(s * world_size + r) * batch_size + j``,
    ``j < batch_size``: the ranks of one step share out consecutive indices, as
    :class:`torch.utils.data.DistributedSampler` shares out a data set, and a run resumed at step
    ``s`` continues the stream exactly.

    Args:
        start_step, end_step: global steps to draw (``end_step`` excluded).
        batch_size: pairs per step and process.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, start_step: int, end_step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start_step, self.end_step = int(start_step), int(end_step)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)

    def indices(self, step: int) -> List[int]:
        first = (step * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's global generators from the worker's
    torch seed (itself derived from the loader's seeded generator). The samples do not depend on
    them (each sample draws from its own generator), but library code that uses them stays
    reproducible. Workers ignore SIGINT and SIGTERM: the training process decides when to stop
    (after a checkpoint), and its workers end with it."""
    import random
    import signal

    seed = torch.initial_seed() % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
