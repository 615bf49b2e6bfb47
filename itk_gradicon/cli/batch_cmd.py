"""``gradicon register-batch``: register every pair of a CSV file with one loaded model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import click

from .common import threads_option, device_option, format_seconds, info, model_option, quiet_option
from .register_cmd import register as _register_command

#: Options of ``gradicon register`` that apply to every pair of a batch, with the same meaning
#: and help text (the per-pair files are CSV columns instead).
SHARED_OPTIONS = ("fixed_modality", "moving_modality", "ct_window", "quantile_range", "mask_mode",
                  "io_iterations", "io_similarity", "io_method", "io_lr", "io_smoothness", "io_dice_weight",
                  "affine", "orientation", "network_region", "io_start", "seed")


@click.command("register-batch")
@click.option("--pairs", required=True, type=click.Path(path_type=Path), metavar="CSV",
              help="CSV file with a header row: fixed, moving and at least one of out_transform, "
                   "out_inverse_transform, out_warped, out_inverse_warped, out_ants_prefix, out_elastix, out_qc, "
                   "out_json (provenance record); optional "
                   "fixed_mask, moving_mask, fixed_labels, moving_labels, initial_transform. Relative paths "
                   "are relative to the CSV file's folder.")
@model_option()
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Pairs run through the network together (prediction only; instance optimisation "
                   "runs pair by pair).  [default: 4 on a GPU, 1 on the CPU]")
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True,
              help="Arithmetic of the network's convolutions during prediction: bfloat16/float16 "
                   "autocast is for CUDA devices only (faster, transforms differ by about 1e-3 of "
                   "the image size); maps and instance optimisation stay float32.")
@click.option("--stop-on-error", is_flag=True,
              help="Stop at the first pair that fails (the default reports it and goes on).")
@click.option("--report", type=click.Path(path_type=Path), metavar="CSV",
              help="Also write one row per pair (status, seconds, error message) to this CSV file.")
@click.option("--shard", metavar="K/N", default=None,
              help="Register only shard K of N: pairs K, K+N, K+2N, ... of the CSV file (every pair is in "
                   "exactly one shard). For job arrays: one shard per job, e.g. --shard "
                   "$((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT.")
@click.option("--skip-existing", is_flag=True,
              help="Do not register a pair whose outputs all exist already (resuming a killed run: a pair's "
                   "outputs are written together or not at all, so existing ones are complete).")
@device_option()
@threads_option()
@quiet_option()
def register_batch(pairs: Path, model: str, batch_size: Optional[int], precision: str, stop_on_error: bool,
                   report: Optional[Path], shard: Optional[str], skip_existing: bool, device: str, quiet: bool,
                   **shared: Any) -> None:
    """Register every pair listed in a CSV file, loading the model once.

    Each pair is registered as 'gradicon register' would register it (same options, same checks)
    and its outputs are written together or not at all. A pair that fails is reported on one line
    and the others go on; the command then exits with status 2. On a GPU several pairs are
    predicted in one batch.

    \b
    Example (pairs.csv):
      fixed,moving,out_transform,out_warped
      sub01_t1.nii.gz,sub01_t2.nii.gz,out/sub01.h5,out/sub01_t2_on_t1.nii.gz
    \b
      gradicon register-batch --pairs pairs.csv --report report.csv
    """
    from ..commands.batch import BatchError, parse_shard, read_pairs, register_pairs, select_shard, write_report
    from ..io.images import check_output_path

    jobs = read_pairs(pairs)
    listed = len(jobs)
    if shard is not None:
        k, n = parse_shard(shard)
        jobs = select_shard(jobs, k, n)
    if report is not None:
        report = check_output_path(report, what="--report", suffixes=(".csv",))
    total = len(jobs)
    info(f"{total} pair(s) from {pairs}" + (f" (shard {shard} of {listed} pairs)" if shard else ""), quiet=quiet)
    progress = _Progress(total)

    def on_result(result) -> None:
        if result.skipped:
            status = "skipped (outputs exist)"
        else:
            status = f"ok in {format_seconds(result.seconds)}" if result.ok else f"failed: {result.message}"
        info(f"[{progress.add(result)}/{total}] {result.pair.origin}: {status}{progress.eta()}",
             quiet=quiet and result.ok)

    summary = register_pairs(jobs, model=model, device=device, batch_size=batch_size, precision=precision,
                             stop_on_error=stop_on_error, options=shared, skip_existing=skip_existing,
                             log=lambda message: info(message, quiet=quiet), on_result=on_result)
    if report is not None:
        write_report(summary, report)
    skipped = len(summary.skipped)
    done = len(summary.results) - len(summary.failed) - skipped
    info(f"{done} of {total} pair(s) registered in {format_seconds(summary.seconds)} "
         f"({summary.pairs_per_second * 60:.1f} pairs/min)" + (f", {skipped} skipped (outputs exist)" if skipped
                                                                else ""), quiet=quiet)
    if summary.failed or len(summary.results) < total:
        not_started = total - len(summary.results)
        raise BatchError(f"{len(summary.failed)} of {total} pair(s) failed"
                         + (f", {not_started} not started (--stop-on-error)" if not_started else "")
                         + f"; first: {summary.failed[0].pair.origin}: {summary.failed[0].message}")


class _Progress:
    """Counts finished pairs and estimates the time left from the pairs registered so far."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.finished = 0
        self.start = time.perf_counter()
        self.registered = 0

    def add(self, result) -> int:
        self.finished += 1
        if not result.skipped:
            self.registered += 1
        return self.finished

    def eta(self) -> str:
        left = self.total - self.finished
        if left <= 0 or self.registered == 0:
            return ""
        per_pair = (time.perf_counter() - self.start) / self.registered
        return f" (ETA {format_seconds(per_pair * left)})"


@click.command("merge-reports")
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="CSV",
              help="The merged report.")
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@quiet_option()
def merge_reports_command(out: Path, reports, quiet: bool) -> None:
    """Merge the --report files of register-batch shards into one report, ordered by pair.

    \b
      gradicon merge-reports --out report.csv reports/shard_*.csv
    """
    from ..commands.batch import merge_reports

    path, rows = merge_reports(reports, out)
    info(f"{rows} pair(s) from {len(reports)} report(s): {path}", quiet=quiet)


register_batch.params.extend(p for p in _register_command.params if p.name in SHARED_OPTIONS)

COMMANDS = [register_batch, merge_reports_command]
