"""Launcher detection (torchrun, SLURM, single) and the megatron-core CPU compatibility layer."""
import os
import stat
import subprocess
import sys

import pytest
import torch

from megatron_tempnet.parallel import cpu, detect_launch_env, slurm_first_host


def test_torchrun_env_wins():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
           "MASTER_PORT": "6000", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (3, 8, 1, "n1", 6000, "torchrun")


def test_slurm_env_one_task_per_gpu(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: parse the node list ourselves
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[012-015,020]", "MASTER_PORT": "29600"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == \
        (9, 16, 1, "gpu012", "slurm")


def test_slurm_first_host_uses_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho alpha-7\necho alpha-9\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert slurm_first_host("alpha-[7,9]") == "alpha-7"


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[3-5]", "a3"),
                                            ("x[10,12],y1", "x10")])
def test_slurm_node_list_parsing(monkeypatch, nodelist, first):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert slurm_first_host(nodelist) == first


def test_single_process_default():
    assert detect_launch_env({}).launcher == "single"
    assert detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


def test_cpu_layer_inactive_with_cuda():
    """In a fresh interpreter where CUDA is reported present, activate() changes nothing."""
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "before = (torch.cuda.synchronize, torch.cuda.current_device, torch.cuda.get_rng_state,\n"
        "          torch.Tensor.cuda, torch.Tensor.type)\n"
        "from megatron_tempnet.parallel import cpu\n"
        "from megatron.core.pipeline_parallel import schedules\n"
        "assert cpu.activate() is False and not cpu.is_active()\n"
        "after = (torch.cuda.synchronize, torch.cuda.current_device, torch.cuda.get_rng_state,\n"
        "         torch.Tensor.cuda, torch.Tensor.type)\n"
        "assert before == after, 'patched although CUDA is available'\n"
        "assert schedules.torch is torch\n"
        "print('untouched')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "untouched" in out.stdout, out.stderr[-3000:]


def test_cpu_layer_refuses_untested_megatron(monkeypatch):
    monkeypatch.setattr(cpu, "_active", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "_mcore_version", lambda: (0, 17))
    with pytest.raises(RuntimeError, match="tested with megatron-core >=0.16,<0.17, found 0.17"):
        cpu.activate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU redirection")
def test_redirected_megatron_calls_work_on_cpu(single_process):
    """The megatron-core calls the layer redirects run on the CPU, with the right semantics."""
    from megatron.core import tensor_parallel
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    assert cpu.is_active()
    # allocation device, synchronize, literal "cuda" factories, Tensor.cuda(), Tensor.type()
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert clip_grads.torch.tensor([1.0], device="cuda").device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64

    # The RNG tracker forks the CPU generator: a forked stream is reproducible and leaves the
    # default stream where it was.
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    with tracker.fork():
        b = torch.rand(4)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    with tracker.fork():
        c = torch.rand(4)
    assert torch.equal(b, c)
    assert a.shape == b.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU redirection")
def test_checkpoint_results_queue_uses_fork_on_cpu(single_process):
    """Item 7: dist_checkpointing's results queue comes from a fork-context Manager (a spawn
    one re-imports __main__, torch and megatron-core: seconds per process)."""
    import time

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert filesystem_async._get_write_results_queue is cpu._fork_results_queue
    t0 = time.perf_counter()
    queue = filesystem_async._get_write_results_queue()
    queue.put("ok")
    assert queue.get(timeout=10) == "ok"
    assert filesystem_async._get_write_results_queue() is queue  # one per process
    assert time.perf_counter() - t0 < 5
