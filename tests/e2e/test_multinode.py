"""Two nodes on one machine: two `deepspeed --no_ssh` launchers, one per node, 2 ranks each.

With --twist.groups 2 the layout puts group 0 on node 0 (ranks 0, 1) and group 1 on node 1
(ranks 2, 3): ZeRO stays inside a node and every aggregation crosses the node boundary, as on
a cluster where groups fit in a node.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import IO

from helpers import free_port, launch_background, stop, tiny_args


def launch_node(node_rank: int, hostfile: Path, port: int, args: list[str], log: IO[str]) -> subprocess.Popen:
    """What each node runs on a cluster without ssh between nodes."""
    node = ["--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(node_rank)]
    node += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    return launch_background("deepspeed", 2, args, output=log, launcher_args=node)


def test_two_nodes_aggregate_across_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")  # names only: --no_ssh never contacts them
    out_dir = tmp_path / "run"
    args = tiny_args(out_dir, twist__groups=2, twist__kappa=0.5, twist__rounds=2, eval__every_rounds=0)
    port = free_port()
    log_paths = [tmp_path / f"node{n}.log" for n in (0, 1)]  # files, not pipes: neither node can block on output
    with open(log_paths[0], "w") as log0, open(log_paths[1], "w") as log1:
        nodes = [launch_node(n, hostfile, port, args, log) for n, log in enumerate((log0, log1))]
        try:
            for node in nodes:
                node.wait(timeout=150)
        finally:
            for node in nodes:  # a node left waiting for its peer must not outlive the test
                stop(node)
    logs = [p.read_text() for p in log_paths]
    for n, (node, log) in enumerate(zip(nodes, logs, strict=True)):
        assert node.returncode == 0, f"node {n} exited {node.returncode}\n{log[-4000:]}"

    head, second = logs
    assert "world 4 = 2 groups x 2 ranks" in head
    assert "node_rank=1" in second and "'node1': [2, 3]" in second  # node 1 runs ranks 2 and 3: group 1
    rounds = [line for line in head.splitlines() if "round 2/2" in line and " sync " in line]
    assert rounds, head[-4000:]

    from mlflow.tracking import MlflowClient

    from twist_scale.tracking import default_uri

    client = MlflowClient(default_uri(out_dir))
    run_id = (out_dir / "mlflow_run_id").read_text().strip()
    sent = client.get_metric_history(run_id, "twist/sync_bytes")
    assert [m.step for m in sent] == [3, 6] and all(m.value > 0 for m in sent)  # both aggregations moved data
    for g in (0, 1):
        assert len(client.get_metric_history(run_id, f"train/loss_group{g}")) == 2
