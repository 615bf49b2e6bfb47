"""Registration of a cohort: every pair listed in a CSV file, with the model loaded once.

This is what ``gradicon register-batch`` runs. The CSV file has a header row; ``fixed`` and
``moving`` are required, at least one output column must be filled on every row, and the other
columns are optional per pair (column names are those of ``gradicon register``'s flags, with ``_``
or ``-``)::

    fixed,moving,out_transform,out_warped
    sub01_t1.nii.gz,sub01_t2.nii.gz,out/sub01_t2_to_t1.h5,out/sub01_t2_on_t1.nii.gz
    sub02_t1.nii.gz,sub02_t2.nii.gz,out/sub02_t2_to_t1.h5,out/sub02_t2_on_t1.nii.gz

Relative paths are relative to the CSV file's folder. Each pair is registered by
:func:`~itk_gradicon.commands.register.run_register`, so each pair's inputs are checked before its work
and its outputs are written in one transaction (all of them or none). A pair that fails is reported
and the batch goes on (unless ``stop_on_error``).

On a GPU, prediction-only runs go through a :class:`BatchingPredictor`: several pairs are read and
prepared on worker threads and their network inputs are run as one batch (exact: BatchNorm uses
running statistics). Instance optimisation tunes a copy of the network per pair, so those pairs run
one after the other.

Example:
    >>> from itk_gradicon.commands.batch import read_pairs, register_pairs       # doctest: +SKIP
    >>> pairs = read_pairs("pairs.csv")                                   # doctest: +SKIP
    >>> summary = register_pairs(pairs, model="unigradicon", device="cuda")  # doctest: +SKIP
    >>> summary.failed                                                    # doctest: +SKIP
    []
"""

from __future__ import annotations

import csv
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import GradiconError, InputError
from ..io.tables import read_rows, row_values, table_path
from .register import RegisterOutputs

PAIR_COLUMNS = ("fixed", "moving")
INPUT_COLUMNS = ("fixed_mask", "moving_mask", "fixed_labels", "moving_labels", "initial_transform")
OUTPUT_COLUMNS = ("out_transform", "out_inverse_transform", "out_warped", "out_inverse_warped", "out_ants_prefix",
                  "out_elastix", "out_qc", "out_json")
COLUMNS = PAIR_COLUMNS + INPUT_COLUMNS + OUTPUT_COLUMNS

Log = Callable[[str], None]


class BatchError(GradiconError):
    """Some pairs of a cohort could not be registered (each was reported)."""


@dataclass
class Pair:
    """One row of the pairs file.

    Attributes:
        number: 1-based position among the pairs.
        origin: where the row came from, for messages (``pairs.csv line 3``).
        fixed, moving: image files.
        inputs: optional per-pair inputs (``fixed_mask``, ..., ``initial_transform``).
        outputs: the destinations.
    """

    number: int
    origin: str
    fixed: Path
    moving: Path
    inputs: Dict[str, Optional[Path]]
    outputs: RegisterOutputs


@dataclass
class PairResult:
    """How one pair went: ``ok`` with the files written, or the one-line error; ``skipped`` when its
    outputs existed already (``skip_existing``)."""

    pair: Pair
    ok: bool
    seconds: float
    message: str = ""
    written: List[Path] = field(default_factory=list)
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("ok" if self.ok else "failed")


@dataclass
class BatchSummary:
    """Results of every pair attempted, in the order of the pairs file."""

    results: List[PairResult]
    seconds: float
    batches: List[int] = field(default_factory=list)

    @property
    def failed(self) -> List[PairResult]:
        return [r for r in self.results if not r.ok]

    @property
    def skipped(self) -> List[PairResult]:
        return [r for r in self.results if r.skipped]

    @property
    def pairs_per_second(self) -> float:
        done = sum(1 for r in self.results if r.ok and not r.skipped)
        return done / self.seconds if self.seconds > 0 else 0.0


def parse_shard(text: str) -> Tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; :class:`InputError` otherwise."""
    parts = str(text).strip().split("/")
    try:
        k, n = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"--shard {text!r}: expected K/N with whole numbers, e.g. 3/10") from None
    if not 1 <= k <= n:
        raise InputError(f"--shard {text!r}: K must be between 1 and N (got K={k}, N={n})")
    return k, n


def select_shard(pairs: Sequence[Pair], k: int, n: int) -> List[Pair]:
    """The pairs of shard ``k`` of ``n``: pair numbers ``k, k + n, k + 2n, ...`` (1-based).

    Every pair belongs to exactly one shard, the shards' sizes differ by at most one, and a shard
    depends only on the pairs file, so the jobs of a scheduler's array can each take one.
    """
    return [p for p in pairs if (p.number - 1) % n == k - 1]


def outputs_exist(pair: Pair) -> bool:
    """Whether every output of ``pair`` exists (outputs are written all together or not at all)."""
    return all(path.exists() for path in pair.outputs.final_paths())


def _column_name(raw: str) -> str:
    return raw.strip().lower().lstrip("-").replace("-", "_")


def read_pairs(path: Union[str, Path]) -> List[Pair]:
    """Read and check a pairs file (structure only; the images are checked pair by pair).

    Raises:
        InputError: the file cannot be read, a column is unknown, ``fixed``/``moving`` or every
            output is missing on a row, or two rows would write the same file.
    """
    from ..errors import did_you_mean

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"--pairs '{path}' does not exist or is not a file")
    try:
        numbered = read_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read --pairs '{path}' as CSV: {err}") from None
    if not numbered:
        raise InputError(f"--pairs '{path}' is empty; it needs a header row with at least the columns "
                         f"fixed, moving and one of {', '.join(OUTPUT_COLUMNS)}")
    header = [_column_name(h) for h in numbered[0][1]]
    for name in header:
        if name not in COLUMNS:
            raise InputError(f"--pairs '{path.name}' has an unknown column {name!r}{did_you_mean(name, COLUMNS)}; "
                             f"allowed: {', '.join(COLUMNS)}")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise InputError(f"--pairs '{path.name}' has the column {duplicated[0]!r} twice")
    missing = [c for c in PAIR_COLUMNS if c not in header]
    if missing or not any(c in header for c in OUTPUT_COLUMNS):
        raise InputError(f"--pairs '{path.name}' needs the columns fixed, moving and at least one of "
                         f"{', '.join(OUTPUT_COLUMNS)}; its header is {', '.join(header)}")
    base = path.resolve().parent

    pairs: List[Pair] = []
    owners: Dict[Path, str] = {}
    for line, values in numbered[1:]:
        origin = f"{path.name} line {line}"
        raw = row_values(header, values)
        if raw is None:
            raise InputError(f"{origin} has {len(values)} values for {len(header)} columns")
        for column in PAIR_COLUMNS:
            if not raw.get(column):
                raise InputError(f"{origin} has no {column} image")
        if not any(raw.get(c) for c in OUTPUT_COLUMNS):
            raise InputError(f"{origin} has no output: fill at least one of {', '.join(OUTPUT_COLUMNS)}")
        paths = {column: table_path(raw.get(column), base) for column in COLUMNS}  # every column is a path
        ants_prefix = paths["out_ants_prefix"]
        outputs = RegisterOutputs(
            transform=paths["out_transform"], inverse_transform=paths["out_inverse_transform"],
            warped=paths["out_warped"], inverse_warped=paths["out_inverse_warped"],
            ants_prefix=str(ants_prefix) if ants_prefix else None,
            elastix_dir=paths["out_elastix"], qc=paths["out_qc"], record=paths["out_json"])
        finals = outputs.final_paths()
        for final in finals:
            if final in owners:
                raise InputError(f"{origin} and {owners[final]} would both write '{final}'")
        if len(set(finals)) != len(finals):
            raise InputError(f"{origin}: two outputs would be written to the same file")
        owners.update({final: origin for final in finals})
        pairs.append(Pair(number=len(pairs) + 1, origin=origin, fixed=paths["fixed"], moving=paths["moving"],
                          inputs={c: paths[c] for c in INPUT_COLUMNS}, outputs=outputs))
    if not pairs:
        raise InputError(f"--pairs '{path.name}' lists no pairs (only a header row)")
    return pairs


@dataclass
class _Request:
    net: Any
    image_A: Any
    image_B: Any
    inverse: bool
    done: bool = False
    result: Optional[Tuple[Any, Any]] = None
    error: Optional[BaseException] = None


class BatchingPredictor:
    """A prediction hook (see :func:`~itk_gradicon.registration.register`) that batches pairs.

    Worker threads, each registering its own pair, call it with their network inputs; a call
    waits until ``batch_size`` requests are queued, or until every live worker is waiting, and the
    requests are then run as one batch (both directions of the pairs that need an inverse included).
    Requests for different network objects are never mixed.

    Args:
        batch_size: most pairs per batch.
        workers: number of threads that will call it; each calls :meth:`worker_finished` when done.
        precision: ``float32``, or ``bfloat16`` / ``float16`` autocast on CUDA devices.
    """

    def __init__(self, batch_size: int, workers: int, precision: str = "float32") -> None:
        if batch_size < 1 or workers < 1:
            raise ValueError("batch_size and workers must be >= 1")
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self.precision = precision
        self.batches: List[int] = []
        self._live = int(workers)
        self._waiting: List[_Request] = []
        self._cond = threading.Condition()

    def __call__(self, net, image_A, image_B, *, inverse: bool):
        request = _Request(net, image_A, image_B, bool(inverse))
        with self._cond:
            self._waiting.append(request)
            self._run_ready()
            while not request.done:
                self._cond.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def worker_finished(self) -> None:
        """A worker has no more pairs: the others no longer wait for it."""
        with self._cond:
            self._live -= 1
            self._run_ready()

    def _run_ready(self) -> None:
        while self._waiting and (len(self._waiting) >= self.batch_size or len(self._waiting) >= self._live):
            net = self._waiting[0].net
            batch = [r for r in self._waiting if r.net is net][:self.batch_size]
            self._waiting = [r for r in self._waiting if not any(r is b for b in batch)]
            try:
                self._run(batch)
            except BaseException as err:  # noqa: BLE001 - handed to the threads waiting for this batch
                for request in batch:
                    if not request.done:
                        request.error, request.done = err, True
            self._cond.notify_all()

    def _run(self, batch: List[_Request]) -> None:
        from ..network.inference import predict_displacements

        import torch

        self.batches.append(len(batch))
        try:
            firsts = [r.image_A for r in batch] + [r.image_B for r in batch if r.inverse]
            seconds = [r.image_B for r in batch] + [r.image_A for r in batch if r.inverse]
            disp, _ = predict_displacements(batch[0].net, torch.cat(firsts), torch.cat(seconds),
                                            inverse=False, precision=self.precision)
        except (RuntimeError, MemoryError):
            if len(batch) == 1:
                raise
            for request in batch:  # too large together (device memory): one at a time
                try:
                    self._run([request])
                except BaseException as err:  # noqa: BLE001 - handed to the thread waiting for it
                    request.error, request.done = err, True
            return
        sizes = [r.image_A.shape[0] for r in batch]
        forward = list(disp[:sum(sizes)].split(sizes))
        inverse_sizes = [s for s, r in zip(sizes, batch) if r.inverse]
        inverses = iter(disp[sum(sizes):].split(inverse_sizes)) if inverse_sizes else iter(())
        for request, ab in zip(batch, forward):
            request.result = (ab, next(inverses) if request.inverse else None)
            request.done = True


def _one_line(err: BaseException) -> str:
    if isinstance(err, GradiconError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def register_pairs(pairs: Sequence[Pair], *, model: Union[str, Any] = "unigradicon", device: str = "auto",
                   batch_size: Optional[int] = None, precision: str = "float32",
                   stop_on_error: bool = False, options: Optional[Dict[str, Any]] = None,
                   skip_existing: bool = False, log: Log = lambda message: None,
                   on_result: Optional[Callable[[PairResult], None]] = None) -> BatchSummary:
    """Register every pair with one loaded model.

    Args:
        pairs: from :func:`read_pairs`.
        model: a model name or file, or a loaded :class:`~itk_gradicon.models.Model`.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: pairs per network batch (default: 4 on a GPU, 1 on the CPU, where a larger
            batch is not faster and needs more memory); only prediction-only runs are batched.
        precision: ``float32``, or ``bfloat16`` / ``float16`` (CUDA only) for the prediction.
        stop_on_error: stop at the first pair that fails (pairs already running finish).
        options: the options shared by every pair, as the flat keywords of
            :class:`~itk_gradicon.pipeline.options.RegistrationOptions` (modalities, instance optimisation, ...),
            and ``seed``.
        skip_existing: a pair whose outputs all exist is not registered again (a resumed run: outputs
            are written all together or not at all, so existing outputs are complete).
        log: receives one-line messages.
        on_result: called after each pair.

    Returns:
        The :class:`BatchSummary`; failed pairs have ``ok = False`` and their error message.

    Raises:
        GradiconError: a problem shared by every pair (model, device, precision).
    """
    from ..models import Model, load_model
    from ..pipeline.options import RegistrationOptions
    from .register import RegisterFiles, run_register

    options = dict(options or {})
    seed = options.pop("seed", None)
    shared = RegistrationOptions.from_keywords(**options)
    torch_device, batch_size = _device_and_batch_size(device, precision, batch_size)
    loaded = model if isinstance(model, Model) else load_model(model)
    iterations = options.get("io_iterations")
    io = (loaded.refinement.iterations if iterations is None else int(iterations)) > 0
    if io and batch_size > 1:
        log(f"note: --batch-size {batch_size} applies to prediction only; with instance optimisation every pair "
            "is registered on its own")
    batcher, predictor = _predictor(batch_size if not io else 1, len(pairs), precision)

    def one(pair: Pair) -> PairResult:
        t = time.perf_counter()
        if skip_existing and outputs_exist(pair):
            return PairResult(pair, True, 0.0, "outputs exist", [], skipped=True)
        try:
            run_register(RegisterFiles(pair.fixed, pair.moving, **pair.inputs), pair.outputs, shared, model=loaded.name,
                         seed=seed, device=str(torch_device), log=lambda m: log(f"{pair.origin}: {m}"),
                         loaded_model=loaded, predictor=predictor)
        except (GradiconError, RuntimeError, MemoryError, OSError, ValueError) as err:
            return PairResult(pair, False, time.perf_counter() - t, _one_line(err))
        return PairResult(pair, True, time.perf_counter() - t, "", pair.outputs.final_paths())

    start = time.perf_counter()
    results = _run_workers(pairs, one, workers=batcher.workers if batcher is not None else 1,
                           stop_on_error=stop_on_error, on_result=on_result,
                           finished=batcher.worker_finished if batcher is not None else None)
    batches = batcher.batches if batcher is not None else []
    return BatchSummary(results, time.perf_counter() - start, batches)


def _device_and_batch_size(device: str, precision: str, batch_size: Optional[int]):
    """The torch device and the batch size of a cohort, after checking the precision against the device."""
    from ..network.inference import PRECISIONS
    from ..registration import resolve_device

    torch_device = resolve_device(device)
    if precision not in PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision != "float32" and torch_device.type != "cuda":
        raise InputError(f"--precision {precision} is for CUDA devices; on {torch_device.type} the network "
                         "runs in float32")
    if batch_size is None:
        batch_size = 4 if torch_device.type == "cuda" else 1
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, not {batch_size}")
    return torch_device, batch_size


def _predictor(batch_size: int, pairs: int, precision: str):
    """``(batcher, predictor)`` for :func:`~itk_gradicon.registration.register`: a
    :class:`BatchingPredictor` for batches of several pairs (one worker thread per pair of a batch),
    a reduced-precision predictor, or ``(None, None)`` for the default prediction."""
    if batch_size > 1:
        batcher = BatchingPredictor(batch_size, max(1, min(batch_size, pairs)), precision)
        return batcher, batcher
    if precision == "float32":
        return None, None
    from ..network.inference import predict_displacements

    def reduced_precision(net, image_A, image_B, *, inverse):
        return predict_displacements(net, image_A, image_B, inverse=inverse, precision=precision)

    return None, reduced_precision


def _run_workers(pairs: Sequence[Pair], one: Callable[[Pair], PairResult], *, workers: int, stop_on_error: bool,
                 on_result: Optional[Callable[[PairResult], None]],
                 finished: Optional[Callable[[], None]]) -> List[PairResult]:
    """Run ``one`` on every pair on ``workers`` threads taking pairs from one queue; results in pair order.

    With ``stop_on_error`` no new pair starts after a failure (pairs already running finish). A bug in
    ``one`` (an exception it does not turn into a failed :class:`PairResult`) stops every worker and is
    raised here. ``finished`` is called as each worker ends (the batching predictor stops waiting for it).
    """
    results: Dict[int, PairResult] = {}
    crashes: List[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()
    todo: "queue.Queue[Pair]" = queue.Queue()
    for pair in pairs:
        todo.put(pair)

    def worker() -> None:
        try:
            while not stop.is_set():
                try:
                    pair = todo.get_nowait()
                except queue.Empty:
                    return
                result = one(pair)
                with lock:
                    results[pair.number] = result
                    if not result.ok and stop_on_error:
                        stop.set()
                    if on_result is not None:
                        on_result(result)
        except BaseException as err:  # noqa: BLE001 - a bug: re-raised in the calling thread
            crashes.append(err)
            stop.set()
        finally:
            if finished is not None:
                finished()

    if workers == 1:
        worker()
    else:
        threads = [threading.Thread(target=worker, name=f"itk_gradicon-pair-{i}") for i in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if crashes:
        raise crashes[0]
    return [results[n] for n in sorted(results)]


REPORT_HEADER = ["pair", "origin", "fixed", "moving", "status", "seconds", "message"]


def write_report(summary: BatchSummary, path: Union[str, Path]) -> Path:
    """Write one CSV row per pair (number, origin, fixed, moving, status ``ok``/``failed``/``skipped``,
    seconds, message), atomically; the reports of several shards merge with :func:`merge_reports`."""
    from ..io.images import atomic_output, check_output_path

    path = check_output_path(path, what="--report", suffixes=(".csv",))
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(REPORT_HEADER)
            for r in summary.results:
                writer.writerow([r.pair.number, r.pair.origin, str(r.pair.fixed), str(r.pair.moving),
                                 r.status, f"{r.seconds:.2f}", r.message])
    return path


def merge_reports(reports: Sequence[Union[str, Path]], path: Union[str, Path]) -> Tuple[Path, int]:
    """Merge the reports of several shards into one, ordered by pair number; returns the path and rows.

    Raises:
        InputError: a file is missing or not a report, or two reports hold the same pair.
    """
    from ..io.images import atomic_output, check_output_path

    rows: Dict[int, List[str]] = {}
    where: Dict[int, str] = {}
    for report in reports:
        report = Path(report)
        if not report.is_file():
            raise InputError(f"report '{report}' does not exist")
        with open(report, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header != REPORT_HEADER:
                raise InputError(f"'{report}' is not a register-batch report (header {header}; expected "
                                 f"{','.join(REPORT_HEADER)})")
            for line, row in enumerate(reader, start=2):
                try:
                    number = int(row[0])
                except (ValueError, IndexError):
                    raise InputError(f"'{report}' line {line}: no pair number") from None
                if number in rows:
                    raise InputError(f"pair {number} is in both '{where[number]}' and '{report}'; merge the "
                                     "reports of distinct shards")
                rows[number], where[number] = row, str(report)
    path = check_output_path(path, what="--out", suffixes=(".csv",))
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(REPORT_HEADER)
            for number in sorted(rows):
                writer.writerow(rows[number])
    return path, len(rows)
