"""The training loop: stages, checkpoints, exact resumption, distributed data parallelism.

:func:`prepare_run` does every check that does not need the network to run (configuration, data
sets, parent model, output folder, device) and :class:`Trainer` trains:

* **Stages.** From scratch, Stage 1 trains the ``levels`` UNets; Stage 2 wraps them with the
  refinement step(s) (``TS{Stage1, Psi}``, zero-initialised, so training starts from Stage 1's maps)
  and trains everything with a fresh Adam (GradICON's protocol). Finetuning has one stage that
  trains all of the parent model.
* **Checkpoints** (:mod:`.checkpoints`) every ``checkpoint.every`` steps, at the end of every stage
  and when stopped. Pairs, augmentations and sample points are functions of ``(seed, step)``
  (:mod:`.seeds`), so a run resumed with ``--resume`` produces bit-identical weights to an
  uninterrupted run (on the CPU; CUDA's ``grid_sample`` backward is not deterministic).
* **Logs.** Every step's loss terms go to ``OUTPUT/log.jsonl``; a progress callback gets them too.
* **Several GPUs or machines** (:mod:`.distributed`): every ``torchrun`` process trains a DDP copy on
  its share of the pair stream (:class:`.data.StepBatchSampler`); rank 0 writes the outputs.
* **Output.** ``OUTPUT/final.pt`` (and ``coarseN.pt`` / ``stage1.pt`` at the end of earlier stages) is a
  model file written by :func:`itk_gradicon.models.save_model_file`, usable at once with
  ``gradicon register --model``; ``OUTPUT/latest.pt``, rewritten with every checkpoint, is the network
  as it was at that checkpoint (a coarse stage's network sees a coarser grid).
* **Coarse-to-fine** (:mod:`.stages`): ``schedule.coarse`` trains the coarsest levels alone first.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import ConfigError, InputError, TrainingError, TrainingStopped  # noqa: F401  (re-exported)
from ..models import FIELD_REFINEMENT, Model, load_model, save_model_file
from ..network import Architecture, build_network
from ..pipeline.losses import gradicon_sample_points
from ..pipeline.preprocess import DEFAULT_CT_WINDOW
from .caching import VolumeLoader
from .checkpoints import (  # noqa: F401  (re-exported: the names users of this module know)
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_torch_save, atomic_write_text, capture_rng_state, check_resumable,
    list_checkpoints, load_checkpoint, restore_rng_state, weights_sha256)
from .config import TrainConfig
from .data import PairDataset, StepBatchSampler, seed_worker
from .distributed import DistInfo, init_distributed  # noqa: F401  (init_distributed: re-exported)
from .listing import scan_member
from .objectives import build_objective
from .planning import CompositeSet, check_composite
from .seeds import PURPOSE_INIT, PURPOSE_LOADER, PURPOSE_POINTS, derived_seed
from .stages import coarse_architecture, data_shape, grow_network, pool_batch  # noqa: F401  (some re-exported)


@dataclass(frozen=True)
class Stage:
    """One training stage: its network, length and first global step."""

    name: str
    architecture: Architecture
    steps: int
    start: int

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass
class TrainingRun:
    """Everything :class:`Trainer` needs, checked by :func:`prepare_run`.

    Attributes:
        config: the configuration.
        composite: the checked composite training set.
        architecture: the final network's architecture.
        parent: the finetuned model (``None`` from scratch).
        stages: the stages in order.
        preprocessing: ``ct_window``, ``quantile_range``, ``layout`` and ``prealignment``, recorded in the
            model file.
        notes: things the user should know (printed before training).
        output: the output folder.
        device: where this process trains.
        dist: this process's place in a distributed run.
        checkpoint: the checkpoint to resume from (``None``: fresh start).
    """

    config: TrainConfig
    composite: CompositeSet
    architecture: Architecture
    parent: Optional[Model]
    stages: List[Stage]
    preprocessing: Dict[str, Any]
    notes: List[str]
    output: Path
    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    checkpoint: Optional[Path] = None

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    @property
    def pairs_per_step(self) -> int:
        return self.config.batch_size * self.dist.world_size

    def describe(self) -> List[str]:
        """A plan for the terminal: data sets, stages, network, output."""
        lines = [f"training set: {len(self.composite.members)} data set(s), "
                 f"{self.composite.pairs_per_epoch} pairs per epoch ({self.config.sampling.mode} sampling)"]
        lines += [f"  {line}" for line in self.composite.describe()]
        arch = self.architecture
        origin = f"finetuning {self.parent.name} ({self.parent.source})" if self.parent else "from scratch"
        lines.append(f"network: {origin}, {arch.dimension}-D, input {'x'.join(map(str, arch.input_shape))}, "
                     f"{arch.num_steps} UNets")
        obj = self.config.objective
        lines.append(f"objective: {obj.kind}, {obj.similarity}, lambda {obj.regularizer_weight:g}"
                     + (f", loss randomisation {obj.loss_randomisation}" if obj.kind == "gradicon" else
                        f", lambda_gcc {obj.lambda_gcc:g}, pre-aligned bridges {obj.prealigned_bridges:g}")
                     + (f", Dice {obj.dice_weight:g}" if obj.dice_weight else ""))
        for s in self.stages:
            lines.append(f"{s.name}: {s.steps} steps of {self.pairs_per_step} pairs "
                         f"({s.steps * self.pairs_per_step / self.composite.pairs_per_epoch:.2f} epochs)")
        processes = f", {self.dist.world_size} processes" if self.dist.distributed else ""
        lines.append(f"device: {self.device}{processes}")
        return lines + [f"note: {n}" for n in self.notes]


def resolve_preprocessing(config: TrainConfig, parent: Optional[Model]) -> Dict[str, Any]:
    """``ct_window``, ``quantile_range``, ``layout`` and ``prealignment``: the configuration's, else the
    parent model's, else the defaults."""
    # null is "not given" (as in the config.yaml a run writes and `--resume` reads back): the parent's value.
    inherited = dict(parent.preprocessing) if parent is not None else {}
    if config.preprocessing.ct_window is not None:
        window = tuple(config.preprocessing.ct_window)
    else:
        window = tuple(inherited.get("ct_window") or DEFAULT_CT_WINDOW)
    if config.preprocessing.quantile_range is not None:
        quantiles = config.preprocessing.quantile_range
    else:
        quantiles = inherited.get("quantile_range")
    layout = config.preprocessing.layout or inherited.get("layout") or "reference"
    prealignment = config.preprocessing.prealignment or inherited.get("prealignment") or "none"
    return {"ct_window": [float(v) for v in window],
            "quantile_range": None if quantiles is None else [float(v) for v in quantiles],
            "layout": layout, "prealignment": prealignment}


def prepare_run(config: TrainConfig, output, *, device: torch.device, resume: bool = False,
                dist: DistInfo = DistInfo(), check_output: bool = True) -> TrainingRun:
    """Check everything before training: parent model, data sets, schedule, output folder, resume.

    Args:
        config: a checked configuration (:func:`.config.load_config`).
        output: the output folder (created by :meth:`Trainer.train` if missing).
        device: the device of this process.
        resume: continue the run in ``output`` from its last checkpoint.
        dist: this process's place in a distributed run.
        check_output: check the output folder (``False`` for a dry run without one).

    Raises:
        ConfigError, InputError, ModelError: a problem the user can fix, named in one line.
    """
    parent = None
    if config.model is not None:
        spec = config.model
        if config.resolve(spec).exists():  # a file named relative to the YAML file's folder
            spec = str(config.resolve(spec))
        parent = load_model(spec)
    if parent is not None:
        architecture = parent.architecture
    else:
        architecture = config.architecture.to_architecture()
    preprocessing = resolve_preprocessing(config, parent)
    members = [scan_member(i, d, config, dimension=architecture.dimension,
                           ct_window=tuple(preprocessing["ct_window"]),
                           quantile_range=None if preprocessing["quantile_range"] is None
                           else tuple(preprocessing["quantile_range"]))
               for i, d in enumerate(config.datasets)]
    composite = CompositeSet(members, config)
    notes = check_composite(composite, config)
    if config.augmentation.permutations and len(set(architecture.input_shape)) == len(architecture.input_shape):
        notes.append("augmentation.permutations: no two network axes have the same size, so none is permuted")
    global_batch = config.batch_size * dist.world_size

    def length(spec) -> int:
        if spec.steps is not None:
            return int(spec.steps)
        return composite.epochs_to_steps(spec.epochs, global_batch)

    schedule = config.schedule
    stages: List[Stage] = []
    if parent is not None:
        stages.append(Stage("finetune", architecture, length(schedule.finetune), 0))
    else:
        for i, spec in enumerate(schedule.coarse or ()):
            start = stages[-1].end if stages else 0
            stages.append(Stage(f"coarse{i + 1}", coarse_architecture(architecture, i + 1), length(spec), start))
        first = replace(architecture, refinement_steps=0)
        stages.append(Stage("stage1", first, length(schedule.stage1), stages[-1].end if stages else 0))
        if architecture.refinement_steps > 0:
            stages.append(Stage("stage2", architecture, length(schedule.stage2), stages[-1].end))
    output = Path(output).expanduser().absolute()
    run = TrainingRun(config, composite, architecture, parent, stages, preprocessing, notes, output, device, dist)
    if check_output:
        _check_output(run, resume)
    return run


def _check_output(run: TrainingRun, resume: bool) -> None:
    output = run.output
    if output.exists() and not output.is_dir():
        raise InputError(f"--output '{output}' exists and is not a folder")
    if not output.exists():
        if not output.parent.is_dir():
            raise InputError(f"--output: folder '{output.parent}' does not exist")
        if not os.access(output.parent, os.W_OK | os.X_OK):
            raise InputError(f"--output: folder '{output.parent}' is not writable")
    elif not os.access(output, os.W_OK | os.X_OK):
        raise InputError(f"--output: folder '{output}' is not writable")
    checkpoints = list_checkpoints(output)
    if not resume:
        if checkpoints or (output / "final.pt").exists() or (output / "log.jsonl").exists():
            raise InputError(f"--output '{output}' already holds a training run; pass --resume to continue it, "
                             "or choose another folder")
        return
    if not checkpoints:
        raise InputError(f"--resume: '{output}' holds no checkpoint (checkpoints/step_*.pt) to continue from")
    run.checkpoint = checkpoints[-1]


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------

@dataclass
class StepReport:
    """What the progress callback receives after every step."""

    stage: str
    stage_step: int
    stage_steps: int
    step: int
    total_steps: int
    losses: Dict[str, float]
    pairs_per_s: float
    eta_s: float
    elapsed_s: float


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.train`."""

    final_model: Optional[Path]
    steps: int
    stopped: bool
    last_checkpoint: Optional[Path]


class Trainer:
    """Trains a :class:`TrainingRun`.

    Args:
        run: the checked run (:func:`prepare_run`).
        log: receives messages (start, checkpoints, stage ends).
        progress: receives a :class:`StepReport` after every step.

    Example:
        >>> cfg = load_config("run.yaml")                                      # doctest: +SKIP
        >>> run = prepare_run(cfg, "runs/a", device=torch.device("cpu"))
        >>> Trainer(run).train().final_model
        PosixPath('runs/a/final.pt')
    """

    def __init__(self, run: TrainingRun, *, log: Callable[[str], None] = lambda message: None,
                 progress: Optional[Callable[[StepReport], None]] = None) -> None:
        self.run = run
        self.log = log
        self.progress = progress
        self._stop_requested = False
        self._durations: deque = deque(maxlen=25)
        self._last_checkpoint: Optional[Path] = None
        self._parent_weights = weights_sha256(run.parent.network) if run.parent is not None else None

    # ---- outputs --------------------------------------------------------------------------------
    @property
    def output(self) -> Path:
        return self.run.output

    @property
    def log_path(self) -> Path:
        return self.output / "log.jsonl"

    def _start_outputs(self, resume_step: Optional[int]) -> None:
        if not self.run.dist.is_main:
            return
        import yaml

        self.output.mkdir(exist_ok=True)
        (self.output / "checkpoints").mkdir(exist_ok=True)
        text = yaml.safe_dump(self.run.config.to_dict(), sort_keys=False)
        atomic_write_text(self.output / "config.yaml", text)
        if resume_step is not None and self.log_path.exists():
            kept = []
            for line in self.log_path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
            atomic_write_text(self.log_path, "".join(f"{line}\n" for line in kept))

    def _write_log(self, record: Dict[str, Any]) -> None:
        if self.run.dist.is_main:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _save_checkpoint(self, stage_index: int, step: int, network: nn.Module,
                         optimizer: torch.optim.Optimizer) -> Optional[Path]:
        if not self.run.dist.is_main:
            return None
        parent = self.run.parent
        content = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step),
            "stage": int(stage_index), "stage_name": self.run.stages[stage_index].name,
            "config": self.run.config.to_dict(), "world_size": self.run.dist.world_size,
            "architecture": self.run.stages[stage_index].architecture.to_dict(),
            "parent_sha256": parent.sha256 if parent is not None else None,
            "parent_weights_sha256": self._parent_weights,
            "network": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
        }
        path = self.output / "checkpoints" / f"step_{step:09d}.pt"
        atomic_torch_save(content, path)
        # a usable model of the network as it is now, for watching a long run (gradicon register --model)
        self._save_model(self.output / "latest.pt", network, self.run.stages[stage_index].architecture, step)
        for old in list_checkpoints(self.output)[:-self.run.config.checkpoint.keep]:
            old.unlink(missing_ok=True)
        self._last_checkpoint = path
        return path

    def _save_model(self, path: Path, network: nn.Module, architecture: Architecture, steps_done: int) -> Path:
        run = self.run
        parent = run.parent
        provenance = {
            "trained_by": f"itk_gradicon {__version__} (gradicon train)",
            "config": run.config.to_dict(),
            "datasets": run.composite.provenance(),
            "stages": [{"name": s.name, "steps": s.steps} for s in run.stages if s.start < steps_done],
            "steps": int(steps_done),
            "pairs_per_step": run.pairs_per_step,
            "world_size": run.dist.world_size,
            "parent": None if parent is None else {"name": parent.name, "source": str(parent.source),
                                                   "sha256": parent.sha256},
            "torch": str(torch.__version__),
        }
        provenance = json.loads(json.dumps(provenance))  # plain data only: the file loads with weights_only
        name = run.config.name or run.output.name
        return save_model_file(path, network, architecture, name=name, preprocessing=run.preprocessing,
                               provenance=provenance, similarity=run.config.objective.similarity,
                               refinement=FIELD_REFINEMENT, domain=run.composite.domain())

    # ---- the loop -------------------------------------------------------------------------------
    def _resume_state(self) -> Optional[Dict[str, Any]]:
        path = self.run.checkpoint
        if path is None:
            return None
        state = load_checkpoint(path)
        note = check_resumable(state, self.run)
        if note:
            self.log(note)
        return state

    def _loader(self, dataset: PairDataset, start: int, end: int) -> torch.utils.data.DataLoader:
        cfg = self.run.config.loader
        rank, world = self.run.dist.rank, self.run.dist.world_size
        sampler = StepBatchSampler(start, end, self.run.config.batch_size, rank, world)
        workers = int(cfg.workers)
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(derived_seed(self.run.config.seed, PURPOSE_LOADER, start, rank)),
            pin_memory=self.run.device.type == "cuda", prefetch_factor=cfg.prefetch if workers > 0 else None)

    def _install_signal_handlers(self) -> Dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def request_stop(signum, frame) -> None:
            self._stop_requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
        return previous

    def train(self, *, stop_after: Optional[int] = None) -> TrainResult:
        """Train (or continue) the run; returns where the model is.

        Args:
            stop_after: stop after this many steps of this call, with a checkpoint (continue later
                with ``resume=True``); ``None`` trains to the end.

        Raises:
            TrainingStopped: SIGINT or SIGTERM arrived; a checkpoint of the last finished step was written.
            TrainingError: the loss became non-finite, or the checkpoint cannot be used.
        """
        run = self.run
        state = self._resume_state()
        step = int(state["step"]) if state is not None else 0
        self._start_outputs(step if state is not None else None)
        if state is not None:
            self.log(f"resuming from {run.checkpoint.name} (step {step} of {run.total_steps})")
        previous_handlers = self._install_signal_handlers()
        try:
            return self._train(state, step, stop_after)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _train(self, state: Optional[Dict[str, Any]], step: int, stop_after: Optional[int]) -> TrainResult:
        run, cfg = self.run, self.run.config
        loader_cache = run.config.resolve(cfg.loader.cache_dir) if cfg.loader.cache_dir else None
        volumes = VolumeLoader(run.architecture.dimension, loader_cache, cfg.loader.memory_cache)
        datasets: Dict[Tuple[int, ...], PairDataset] = {}
        first_stage = int(state["stage"]) if state is not None else 0
        if state is None:  # a fresh run: every global generator starts from the seed
            random.seed(cfg.seed)
            np.random.seed(cfg.seed % 2 ** 32)
            torch.manual_seed(derived_seed(cfg.seed, PURPOSE_INIT, 0))
        network: Optional[nn.Module] = None
        steps_this_call = 0
        start_time = time.perf_counter()
        for index in range(first_stage, len(run.stages)):
            stage = run.stages[index]
            resumed = state if index == first_stage else None
            network = self._stage_network(index, network, resumed)
            optimizer = torch.optim.Adam(network.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                                         weight_decay=cfg.optimizer.weight_decay)
            if resumed is not None:
                optimizer.load_state_dict(resumed["optimizer"])
                restore_rng_state(resumed["rng"])
            step = max(step, stage.start)
            if step < stage.end:
                self.log(f"{stage.name}: steps {step - stage.start + 1}..{stage.steps}")
            model = self._objective(network)
            end = stage.end if stop_after is None else min(stage.end, step + (stop_after - steps_this_call))
            if step < end:
                shape = data_shape(run.architecture.input_shape, stage.architecture.input_shape)
                if shape not in datasets:
                    datasets[shape] = PairDataset(run.composite, shape, cfg.augmentation, volumes,
                                                  layout=run.preprocessing["layout"])
                for batch in self._loader(datasets[shape], step, end):
                    terms = self._step(model, optimizer, pool_batch(batch, stage.architecture.input_shape), step)
                    step += 1
                    steps_this_call += 1
                    self._report(stage, step, terms, start_time, steps_this_call)
                    stop_now = self._agree(self._stop_requested)
                    if step % cfg.checkpoint.every == 0 or step == stage.end or stop_now:
                        self._save_checkpoint(index, step, network, optimizer)
                    if stop_now:
                        self._barrier()
                        raise TrainingStopped(
                            f"stopped at step {step} of {run.total_steps}; checkpoint "
                            f"{self._last_checkpoint or run.output / 'checkpoints'}; continue with --resume")
            if step < stage.end:  # stop_after reached inside this stage
                self._save_checkpoint(index, step, network, optimizer)
                self._barrier()
                self.log(f"stopped after {steps_this_call} step(s) at step {step} of {run.total_steps}; "
                         "continue with --resume")
                return TrainResult(None, step, True, self._last_checkpoint)
            if state is not None and index == first_stage and steps_this_call == 0 and self._last_checkpoint is None:
                self._last_checkpoint = run.checkpoint
            if index < len(run.stages) - 1 and run.dist.is_main:
                path = self._save_model(run.output / f"{stage.name}.pt", network, stage.architecture, step)
                self.log(f"{stage.name} finished at step {step}: {path}")
        final = None
        if run.dist.is_main:
            network.eval()
            final = self._save_model(run.output / "final.pt", network, run.stages[-1].architecture, step)
            self.log(f"finished: {step} steps, model {final}")
        self._barrier()
        return TrainResult(final or run.output / "final.pt", step, False, self._last_checkpoint)

    def _stage_network(self, index: int, previous: Optional[nn.Module],
                       resumed: Optional[Dict[str, Any]]) -> nn.Module:
        """The network stage ``index`` trains, in training mode on the run's device: the checkpoint's
        (a resumed stage), the parent model's (finetuning), a fresh one (first stage), or the previous
        stage's grown by its new levels (coarse-to-fine)."""
        run, cfg = self.run, self.run.config
        stage = run.stages[index]
        if resumed is not None:
            network = build_network(stage.architecture)
            network.load_state_dict(resumed["network"], strict=True)
        elif previous is None and run.parent is not None:
            network = build_network(stage.architecture)
            network.load_state_dict(run.parent.network.state_dict(), strict=True)
        elif previous is None:
            torch.manual_seed(derived_seed(cfg.seed, PURPOSE_INIT, 1))
            network = build_network(stage.architecture)
        else:
            network = grow_network(previous, run.stages[index - 1].architecture, stage.architecture, cfg.seed)
        network.to(run.device).train()
        for p in network.parameters():
            p.requires_grad_(True)
        return network

    def _objective(self, network: nn.Module) -> nn.Module:
        """The configured objective around ``network`` (wrapped for distributed training)."""
        run, cfg = self.run, self.run.config
        objective = build_objective(cfg.objective.kind, network, similarity=cfg.objective.similarity,
                                    lmbda=cfg.objective.regularizer_weight, dice_weight=cfg.objective.dice_weight,
                                    dice_grid=cfg.objective.dice_grid,
                                    lambda_gcc=cfg.objective.lambda_gcc).to(run.device)
        if not run.dist.distributed:
            return objective
        from torch.nn.parallel import DistributedDataParallel

        device = run.device
        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    def _step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Dict[str, Any],
              step: int) -> Dict[str, float]:
        run = self.run
        device = run.device
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        image = batch.get("image_B", batch.get("image_T"))
        generator = torch.Generator().manual_seed(derived_seed(run.config.seed, PURPOSE_POINTS, step, run.dist.rank))
        points = gradicon_sample_points(image.shape[2:], like=image, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        terms = model(batch, points)
        names = sorted(terms)
        values = torch.stack([terms[k].detach().float().reshape(()) for k in names])
        if run.dist.distributed:
            import torch.distributed as dist

            dist.all_reduce(values)
            values = values / run.dist.world_size
        floats = dict(zip(names, values.tolist()))
        if not all(np.isfinite(v) for v in floats.values()):
            where = f"; the last checkpoint is {self._last_checkpoint}" if self._last_checkpoint else ""
            raise TrainingError(f"the loss became non-finite at step {step + 1} ({floats}); try a smaller "
                                f"optimizer.lr{where}")
        terms["total"].backward()
        optimizer.step()
        return floats

    def _report(self, stage: Stage, step: int, losses_: Dict[str, float], start_time: float, done: int) -> None:
        now = time.perf_counter()
        self._durations.append(now)
        elapsed = now - start_time
        if len(self._durations) >= 2:
            per_step = (self._durations[-1] - self._durations[0]) / (len(self._durations) - 1)
        else:
            per_step = elapsed / max(done, 1)
        pairs_per_s = self.run.pairs_per_step / per_step if per_step > 0 else float("inf")
        eta = per_step * (self.run.total_steps - step)
        record = {"step": step, "stage": stage.name, "stage_step": step - stage.start,
                  "epoch": step * self.run.pairs_per_step / self.run.composite.pairs_per_epoch,
                  "lr": self.run.config.optimizer.lr, **losses_, "pairs_per_s": round(pairs_per_s, 3),
                  "elapsed_s": round(elapsed, 3)}
        self._write_log(record)
        if self.progress is not None:
            self.progress(StepReport(stage.name, step - stage.start, stage.steps, step, self.run.total_steps,
                                     losses_, pairs_per_s, eta, elapsed))

    def _agree(self, flag: bool) -> bool:
        """Whether any process has ``flag`` set (all processes must stop at the same step)."""
        if not self.run.dist.distributed:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.run.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _barrier(self) -> None:
        if self.run.dist.distributed:
            import torch.distributed as dist

            dist.barrier()
