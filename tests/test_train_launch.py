"""Reading the launcher's environment (torchrun, srun, none) and the lock that keeps two runs out of one folder."""
import subprocess
import sys
import textwrap

import pytest

from fastclip.train.launch_env import DEFAULT_PORT, PORT_BASE, PORT_SPAN, first_host, read_placement
from fastclip.train.main import main


@pytest.mark.parametrize("nodelist, host", [
    ("gpu-[003-005,9],cpu1", "gpu-003"), ("node1,node2", "node1"), ("a[07]", "a07"), ("127.0.0.1", "127.0.0.1"),
    ("rack[2-3]-n[01-04]", "rack2-n[01-04]"),  # only the first bracket is a range here: what SLURM would expand first
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_placement_from_torchrun_srun_or_nothing():
    torchrun = read_placement({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (3, 8, 1, "torchrun")
    assert read_placement({}).launcher == "none"
    assert read_placement({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"  # srun -n 1 [torchrun]
    srun = read_placement({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu-[010-013]", "SLURM_JOB_ID": "123456"})
    assert (srun.rank, srun.world_size, srun.local_rank, srun.launcher) == (5, 16, 1, "slurm")
    assert (srun.master_addr, srun.master_port) == ("gpu-010", PORT_BASE + 123456 % PORT_SPAN)
    assert len(srun.notes) == 2  # both derived, and said
    given = read_placement({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (given.master_addr, given.master_port, given.notes) == ("head", 1234, [])
    assert read_placement({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}).master_port == DEFAULT_PORT
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        read_placement({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from fastclip.train.run_lock import lock_run_folder
    lock_run_folder(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
""")


def test_a_second_run_into_a_busy_output_dir_exits_2_before_writing_anything(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the first run holds the folder
        status = main(["--dataset-type", "synthetic", "--train-num-samples", "8", "--batch-size", "4",
                       "--output-dir", str(folder), "--workers", "0"])
        assert status == 2
        assert "is in use: another fastclip run is training into it" in capsys.readouterr().err
        assert list(folder.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
