"""The CUDA paths of issue 17 on a real GPU (NCCL, CUDA generators, pinned memory, host syncs).

Marked `gpu` and skipped without CUDA; run on a GPU machine with `python -m pytest -q -m gpu tests/gpu`.
The CPU stand-ins of these checks are in tests/test_device_paths.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = torch.device("cuda", 0)


@pytest.fixture
def nccl_group():
    """A one-rank NCCL process group in this process (collectives still check the tensor's device)."""
    from tests.distributed_helpers import free_port

    torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}",
                            device_id=DEVICE)
    yield
    dist.destroy_process_group()


def _syncs(fn) -> int:
    """Host synchronisations fn() causes (torch's CUDA sync debug mode warns once per sync)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_first_rank_setup_under_nccl(nccl_group):
    from largefr.data.prepare import DataSetupError, run_on_first_rank

    ran = []
    run_on_first_rank(lambda: ran.append(True), "setup", device=DEVICE)
    assert ran == [True]
    with pytest.raises(DataSetupError, match="setup failed on rank 0"):
        run_on_first_rank(lambda: 1 / 0, "setup", device=DEVICE)


def test_head_flags_without_gradients_under_nccl(nccl_group):
    from largefr.train.head_step import grads_finite_everywhere, global_grad_norm

    weight = torch.nn.Parameter(torch.ones(4, 3, device=DEVICE))
    assert grads_finite_everywhere([weight], group=None)
    assert float(global_grad_norm(sharded=[weight], replicated=[], group=None)) == 0.0


def test_generator_states_cross_between_cuda_and_cpu():
    from largefr.stateful import capture_generator_state, reseed_value, restore_generator_state

    gpu, cpu = torch.Generator(device=DEVICE).manual_seed(5), torch.Generator().manual_seed(5)
    torch.rand(3, generator=gpu, device=DEVICE)
    saved_gpu, saved_cpu = capture_generator_state(gpu), capture_generator_state(cpu)
    assert saved_gpu["device_type"] == "cuda" and saved_cpu["device_type"] == "cpu"
    target_cpu, target_gpu = torch.Generator().manual_seed(9), torch.Generator(device=DEVICE).manual_seed(9)
    assert not restore_generator_state(target_cpu, saved_gpu, step=3)
    assert not restore_generator_state(target_gpu, saved_cpu, step=3)
    assert target_cpu.initial_seed() == target_gpu.initial_seed() == reseed_value(9, 3)
    again = torch.Generator(device=DEVICE).manual_seed(1)
    assert restore_generator_state(again, saved_gpu, step=3)  # same device type: the stream continues
    assert torch.equal(torch.rand(4, generator=again, device=DEVICE), torch.rand(4, generator=gpu, device=DEVICE))


def test_torch_loader_batches_are_pinned(tmp_path):
    from largefr.data import build_loader
    from largefr.data.synthetic import generate_dataset

    generate_dataset(tmp_path, identities=4, images_per_identity=4, pairs=4, image_size=32, seed=1, progress=False)
    loader = build_loader("torch", rec=str(tmp_path), batch_size=4, rank=0, world_size=1, num_classes=4,
                          image_size=32, num_workers=0, device=DEVICE)
    images, labels = next(iter(loader))
    assert images.is_pinned() and labels.is_pinned()


def test_finiteness_agreement_reads_the_device_once(nccl_group):
    from largefr.train.step import StepRunner

    class _Engine:
        def gradient_accumulation_steps(self) -> int:
            return 1

    runner = StepRunner(engine=_Engine(), head=None, head_step=None, device=DEVICE)
    loss = torch.tensor(1.5, device=DEVICE)
    assert _syncs(lambda: runner._agree(loss, False)) == 1
    assert runner._agree(loss * float("nan"), True) == (False, True)


def test_label_and_row_checks_do_not_synchronise():
    from largefr.config import HeadConfig
    from largefr.heads.optim import RowSparseSGD
    from largefr.heads.sharded_head import ShardedMarginHead

    head = ShardedMarginHead(10, 8, margin=HeadConfig(), device=DEVICE)
    features = torch.randn(6, 8, device=DEVICE)
    labels = torch.arange(6, device=DEVICE)
    assert _syncs(lambda: head._check_inputs(features, labels, None)) == 0
    weight = torch.nn.Parameter(torch.ones(6, 2, device=DEVICE))
    rows = torch.tensor([0, 2, 5], device=DEVICE)
    assert _syncs(lambda: RowSparseSGD._check_rows(rows, weight)) == 0


def test_radial_block_on_cuda_gives_the_cpu_gradient():
    from largefr.config import HeadConfig
    from largefr.heads.sharded_head import ShardedMarginHead

    grads = {}
    for device in ("cpu", DEVICE):
        head = ShardedMarginHead(1000, 16, margin=HeadConfig(), device=device,
                                 generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(1)
        features = torch.randn(32, 16, generator=generator).to(device)
        labels = torch.randint(0, 1000, (32,), generator=generator).to(device)
        head(features, labels).backward()
        grads[str(device)] = head.weight.grad.to_dense().cpu()
    torch.testing.assert_close(grads[str(DEVICE)], grads["cpu"], rtol=1e-4, atol=1e-6)


def test_head_bench_peak_ignores_other_resident_tensors():
    from largefr.perf.head_bench import HeadBench, HeadBenchSettings

    settings = HeadBenchSettings(batch=64, classes=20_000, dim=64, world=1, gemm_floor=False)
    bench = HeadBench(settings, 0, DEVICE)
    alone = bench.peak_memory_mb()
    ballast = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)  # 256 MiB resident elsewhere
    with_ballast = bench.peak_memory_mb()
    del ballast
    assert with_ballast == pytest.approx(alone, rel=0.02)


def test_generated_data_gas_2_training_and_resume_on_gpu(tmp_path):
    """Defect 1 (rank 0 generates the data under NCCL), 2 (gas 2) and 3 (GPU-saved checkpoint) end to end."""
    from tests.gpu.gpu_helpers import small_run_config, spawn_one_rank, train_run

    config = small_run_config(tmp_path, train={"gradient_accumulation_steps": 2})
    first = spawn_one_rank(train_run, config, None)
    config["train"]["max_steps"] = 3
    resumed = spawn_one_rank(train_run, config, "auto")
    assert first["step"] == 2 and resumed["step"] == 3
    assert first["device"] == resumed["device"] == str(DEVICE)
