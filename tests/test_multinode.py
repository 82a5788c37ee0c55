"""Multi-node launch (issue 22): two torchrun "nodes" of one process each on localhost (CPU, gloo, c10d
rendezvous), the README's N-node command at N = 2, pre-train a tiny SimSiam with the streamed loader; one record,
both nodes' shards cached, and every rank ends with the same trained weights as the record's backbone.pt."""
import hashlib
import json
import os
import socket
import subprocess
import sys

import torch

STEPS = 2
PRETRAIN = ["pretrain", "--method", "simsiam", "--corpus", "phantom-corpus", "--set", f"method.pretrain.steps={STEPS}",
            "--set", "method.pretrain.log_every=1", "--set", "method.pretrain.loader=stream",
            "--set", "run.loader_workers=1", "--set", "run.device=cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(state) -> str:
    """The SHA-256 protocol._rank_report takes of a state dict."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_two_nodes_one_process_each_write_one_record_with_rank_consistent_weights(phantom_home, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SSLBENCH_KILL_AFTER_STEP")}
    env.update(OMP_NUM_THREADS="1", SSLBENCH_DATA=str(phantom_home), SSLBENCH_CACHE=str(tmp_path / "cache"),
               SSLBENCH_RANK_REPORT=str(tmp_path / "ranks"))
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=sslbench-multinode-test", "--max-restarts=0",
               "-m", "sslbench", *PRETRAIN, "--out", str(tmp_path / "out")]
        nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for proc in nodes:
            out, err = proc.communicate(timeout=540)
            outs.append(out)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
    runs = list((tmp_path / "out" / "pretrain" / "simsiam" / "phantom-corpus").iterdir())
    assert len(runs) == 1                                            # one record for the job
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["loader"] == "stream" and len(metrics["history"]) == STEPS
    assert "rank 0 of 2 reads its shard of" in (runs[0] / "log.txt").read_text()
    assert sum(o.count("pre-trained simsiam") for o in outs) == 1   # only global rank 0 talks
    # every rank cached its own shard: all training volumes of the corpus are in the cache, none twice
    assert len(list((tmp_path / "cache").rglob("*.image.npy"))) == metrics["volumes"]
    reports = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and {r["world_size"] for r in reports} == {2}
    # rank-consistent: both ranks logged the same (all-reduced) losses and hold the same weights, rank 0's record's
    assert reports[0]["history"] == reports[1]["history"] == metrics["history"]
    backbone = torch.load(runs[0] / "checkpoints" / "backbone.pt", weights_only=True)
    assert reports[0]["state_sha256"] == reports[1]["state_sha256"] == _digest(backbone)
