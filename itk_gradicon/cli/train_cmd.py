"""``gradicon train``: train or finetune a GradICON-family network on a composite data set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .common import threads_option, ProgressLine, device_option, format_seconds, info, quiet_option


@click.command("train")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), metavar="YAML",
              help="Training configuration (data sets, sampling, objective, schedule); see examples/*.yaml. "
                   "Relative paths in it are resolved against its folder.")
@click.option("--output", type=click.Path(path_type=Path), metavar="DIR",
              help="Folder for checkpoints, log.jsonl, config.yaml and the model final.pt (created if missing).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --output from its last checkpoint, exactly where it stopped.")
@click.option("--model", "model", default=None, metavar="NAME|FILE",
              help="Finetune this model (unigradicon, multigradicon, or a model/weight file); replaces 'model' "
                   "in the configuration.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, metavar="STEPS",
              help="Stop after this many steps, with a checkpoint; continue later with --resume (for "
                   "time-limited jobs).")
@click.option("--check", is_flag=True,
              help="Check the configuration and every listed file, print the plan, and exit without training.")
@device_option()
@threads_option()
@quiet_option()
def train(config_path: Path, output: Optional[Path], resume: bool, model: Optional[str], stop_after: Optional[int],
          check: bool, device: str, quiet: bool) -> None:
    """Train or finetune a registration network: uniGradICON, multiGradICON and M2M-Reg recipes.

    Everything is checked before training starts (configuration keys, every image, mask and
    segmentation, the parent model, the output folder). Progress goes to the terminal and every
    step's loss terms to DIR/log.jsonl; checkpoints are written atomically to DIR/checkpoints, and
    the final model DIR/final.pt works at once with 'gradicon register --model DIR/final.pt'.

    Several GPUs or machines: start one process per GPU with torchrun, e.g.
    'torchrun --no-python --nproc-per-node 4 gradicon train --config run.yaml --output DIR'.

    \b
    Example:
      gradicon train --config examples/finetune.yaml --output runs/my_finetune
      gradicon train --config examples/finetune.yaml --output runs/my_finetune --resume
    """
    from ..errors import InputError
    from ..training import load_config, prepare_run
    from ..training.trainer import Trainer, TrainingStopped, init_distributed

    if output is None and not check:
        raise InputError("--output DIR is required (except with --check)")
    if check and resume:
        raise InputError("--check and --resume cannot be combined")
    config = load_config(config_path, model=model)
    dist_info, torch_device = init_distributed(device)
    quiet = quiet or not dist_info.is_main
    try:
        run = prepare_run(config, output if output is not None else Path("."), device=torch_device, resume=resume,
                          dist=dist_info, check_output=not check)
        for line in run.describe():
            info(line, quiet=quiet)
        if check:
            info("configuration and data are valid; nothing was trained (--check)", quiet=quiet)
            return
        line = ProgressLine(quiet)
        log_every = config.log_every

        def progress(report) -> None:
            if report.step % log_every and report.stage_step != report.stage_steps:
                return
            order = ("total", "similarity", "gradicon", "gradcycon", "dice")
            names = [k for k in order if k in report.losses] + sorted(set(report.losses) - set(order))
            terms = "  ".join(f"{k} {report.losses[k]:.4f}" for k in names if k == "total" or report.losses[k])
            line.update(f"{report.stage} {report.stage_step}/{report.stage_steps}  step {report.step}/"
                        f"{report.total_steps}  {terms}  {report.pairs_per_s:.1f} pairs/s  "
                        f"ETA {format_seconds(report.eta_s)}", final=report.stage_step == report.stage_steps)

        trainer = Trainer(run, log=lambda m: info(m, quiet=quiet), progress=progress)
        try:
            result = trainer.train(stop_after=stop_after)
        except TrainingStopped as stopped:
            click.echo(f"Interrupted: {stopped}", err=True)
            raise click.exceptions.Exit(stopped.exit_code) from None
        if result.final_model is not None and not result.stopped:
            info(f"register with: gradicon register --model {result.final_model} --fixed F --moving M "
                 "--out-transform T.h5", quiet=quiet)
    finally:
        if dist_info.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


COMMANDS = [train]
