"""GPU paths: reduced-precision prediction, the batching predictor's fallback when a batch does not fit,
the device memory check. They run where CUDA is present; elsewhere pytest reports them as skipped with
the reason (``-rs``). The CPU halves of the same promises run everywhere."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import randomize, tiny_architecture
from itk_gradicon.commands.batch import BatchingPredictor
from itk_gradicon.network.builders import build_network
from itk_gradicon.network.inference import autocast_context, predict_displacements

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available: GPU paths run where a GPU is")


def _net(device):
    return randomize(build_network(tiny_architecture()), seed=3).to(device).eval()


def _pair(device, n: int = 1):
    generator = torch.Generator().manual_seed(5)
    shape = (n, 1) + tiny_architecture().input_shape
    return (torch.rand(shape, generator=generator).to(device), torch.rand(shape, generator=generator).to(device))


def test_reduced_precision_is_a_no_op_on_the_cpu():
    net, (a, b) = _net("cpu"), _pair("cpu")
    full, _ = predict_displacements(net, a, b, inverse=False)
    for precision in ("bfloat16", "float16"):
        assert isinstance(autocast_context(torch.device("cpu"), precision), type(autocast_context("cpu")))
        reduced, _ = predict_displacements(net, a, b, inverse=False, precision=precision)
        assert torch.equal(reduced, full)


@needs_cuda
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_on_cuda_stays_close_to_float32(precision):
    net, (a, b) = _net("cuda"), _pair("cuda")
    full, full_inverse = predict_displacements(net, a, b, inverse=True)
    reduced, reduced_inverse = predict_displacements(net, a, b, inverse=True, precision=precision)
    assert reduced.dtype == torch.float32 and reduced_inverse is not None
    scale = float(full.abs().max())
    # bound chosen, not yet measured: no GPU has been lent to this project (bf16 keeps 8 bits of mantissa)
    assert float((reduced - full).abs().max()) < 0.02 * scale + 1e-6
    assert float((reduced_inverse - full_inverse).abs().max()) < 0.02 * scale + 1e-6


@needs_cuda
def test_cuda_memory_check_reads_the_device():
    from itk_gradicon.registration import available_memory_bytes

    free, reason = available_memory_bytes(torch.device("cuda"))
    assert free is not None and 0 < free <= torch.cuda.get_device_properties(0).total_memory, reason


def _predict_in_threads(predictor, net, pairs):
    results, errors = [None] * len(pairs), []

    def work(i):
        try:
            results[i] = predictor(net, *pairs[i], inverse=False)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
        finally:
            predictor.worker_finished()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_batch_too_large_for_the_device_falls_back_to_one_pair_at_a_time(device, monkeypatch):
    """A batch that raises out-of-memory is run pair by pair, with the same results as alone."""
    import itk_gradicon.network.inference as inference

    net = _net(device)
    pairs = [_pair(device) for _ in range(3)]
    alone = [predict_displacements(net, a, b, inverse=False)[0] for a, b in pairs]
    real = inference.predict_displacements

    def out_of_memory_for_batches(net, image_A, image_B, **kwargs):
        if image_A.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(net, image_A, image_B, **kwargs)

    monkeypatch.setattr(inference, "predict_displacements", out_of_memory_for_batches)
    predictor = BatchingPredictor(batch_size=3, workers=3)
    results, errors = _predict_in_threads(predictor, net, pairs)
    assert not errors
    assert predictor.batches[0] == 3 and predictor.batches[1:] == [1, 1, 1]
    for (got, _), expected in zip(results, alone):
        assert torch.equal(got, expected)
