"""Training and finetuning of GradICON-family networks (``gradicon train``).

Modules, in the order data flows:

* :mod:`.config`: the YAML configuration as typed dataclasses, checked key by key;
* :mod:`.data`: composite data sets (lists, CSV files, globs), pair sampling (uniGradICON per data
  set, multiGradICON weighted, region-balanced finetuning; loss randomisation B/F/R; M2M-Reg cycles),
  preprocessing shared with registration, caching and augmentation;
* :mod:`.objectives`: the GradICON objective with loss randomisation and M2M-Reg's cyclic objective;
* :mod:`.trainer`: stages, checkpoints, exact resumption, distributed data parallelism, the model file.

Example:
    >>> import torch
    >>> from itk_gradicon.training import load_config, prepare_run, Trainer   # doctest: +SKIP
    >>> run = prepare_run(load_config("examples/finetune.yaml"), "runs/ft", device=torch.device("cpu"))
    >>> Trainer(run, log=print).train().final_model
    PosixPath('runs/ft/final.pt')
"""

from .config import TrainConfig, load_config
from .trainer import Trainer, TrainingRun, prepare_run

__all__ = ["TrainConfig", "load_config", "prepare_run", "Trainer", "TrainingRun"]
