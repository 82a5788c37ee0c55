"""Issue 21: a run's torch switches (cuDNN autotuning, thread count) are scoped to the run and restored after it,
so nothing of one run leaks into the next in the same process (sweep trials, the demo's two rows, tests)."""
import pytest
import torch

from sslbench.cli import main
from sslbench.protocol.runtime import run_settings


def test_run_settings_set_the_run_threads_and_restore_them_even_on_an_error():
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    with run_settings({"device": "cpu", "num_threads": want}) as now:
        assert torch.get_num_threads() == want and now["threads"] == want
        assert now["cudnn_benchmark"] is torch.backends.cudnn.benchmark
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):
        with run_settings({"device": "cpu", "num_threads": want}):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_cudnn_autotuning_is_left_alone_on_the_cpu_and_restored():
    flag = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with run_settings({"device": "cpu"}):
            assert torch.backends.cudnn.benchmark is False      # a CPU run does not switch it on
        torch.backends.cudnn.benchmark = True
        with run_settings({"device": "cpu"}):
            torch.backends.cudnn.benchmark = False              # whatever happens inside ...
        assert torch.backends.cudnn.benchmark is True           # ... the value before the run comes back
    finally:
        torch.backends.cudnn.benchmark = flag


def test_an_in_process_pretraining_leaves_the_thread_count_as_it_found_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SSLBENCH_DATA", str(tmp_path / "data"))
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    code = main(["pretrain", "--method", "simsiam", "--preset", "tiny", "--corpus", "phantom-corpus",
                 "--set", "method.pretrain.steps=1", "--set", "run.device=cpu", "--set", f"run.num_threads={want}",
                 "--set", "corpus.data.phantom_cases=2", "--out", str(tmp_path / "runs")])
    assert code == 0
    log = next((tmp_path / "runs").rglob("env.json")).read_text()
    assert f'"threads": {want}' in log                        # the run ran with its own count ...
    assert torch.get_num_threads() == before                  # ... and handed the process back unchanged


def _rss_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_the_end_of_a_run_hands_the_freed_memory_back():
    """keep_freed_memory (a run's device set-up) keeps freed buffers in the heap; the run's scope ending gives
    them back, so a process running many runs does not keep each one's high-water mark."""
    import numpy as np

    from sslbench.protocol.runtime import keep_freed_memory

    with run_settings({"device": "cpu"}):
        keep_freed_memory()
        block = np.ones(300 * 2 ** 20 // 8)          # 300 MiB: on the heap under the run's 1 GiB mmap threshold
        held = _rss_mb()
        del block
        assert _rss_mb() > held - 100                # freed, but kept by the process inside the run
    assert _rss_mb() < held - 200                    # handed back when the run ended


def test_a_pretraining_records_the_attention_kernel_its_method_ran_and_hands_it_plain_floats(tmp_path, monkeypatch):
    """env.json's runtime.attention is the kernel the pre-training's Swin ran (method.params.attention, applied by
    the runtime), not run.attention (the fine-tuned network's kernel, which pre-training does not run); and the
    method's forward gets plain float tensors (the memory loader's corpus comes from MONAI MetaTensors)."""
    import json

    from sslbench.methods.simsiam import SimSiam
    from sslbench.speed import fast_swin

    seen = []
    forward = SimSiam.forward
    monkeypatch.setattr(SimSiam, "forward", lambda self, v, step: seen.append((type(v), v.dtype)) or forward(self, v, step))

    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SSLBENCH_DATA", str(tmp_path / "data"))
    ran = []
    real = fast_swin.apply_attention
    monkeypatch.setattr(fast_swin, "apply_attention", lambda m, kind: ran.append(kind) or real(m, kind))
    code = main(["pretrain", "--method", "simsiam", "--preset", "tiny", "--corpus", "phantom-corpus",
                 "--set", "method.pretrain.steps=1", "--set", "run.device=cpu", "--set", "method.params.attention=sdpa",
                 "--set", "run.attention=monai", "--set", "corpus.data.phantom_cases=2", "--out", str(tmp_path / "runs")])
    assert code == 0
    env = json.loads(next((tmp_path / "runs").rglob("env.json")).read_text())
    assert ran and set(ran) == {"sdpa"}                       # what ran ...
    assert env["runtime"]["attention"] == "sdpa"              # ... is what the record says
    assert seen and set(seen) == {(torch.Tensor, torch.float32)}   # no MetaTensor reaches the method


def test_a_benchmark_hands_back_the_torch_switches_it_set_even_on_an_error():
    """bench's cuDNN autotuning and TF32 switches are the benchmark's own: restored when it returns or raises."""
    from sslbench.bench import restores_torch_switches

    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    @restores_torch_switches
    def a_benchmark(fail: bool):
        torch.backends.cudnn.benchmark = not before[0]
        torch.backends.cuda.matmul.allow_tf32 = not before[1]
        torch.backends.cudnn.allow_tf32 = not before[2]
        if fail:
            raise RuntimeError("out of memory")
        return "row"

    assert a_benchmark(False) == "row"
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(RuntimeError):
        a_benchmark(True)
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32) == before
