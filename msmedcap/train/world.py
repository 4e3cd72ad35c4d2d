"""The process's place in the distributed world when no launcher set one up."""
import os


def single_process_env() -> None:
    """`python launch/pretrain.py` (or the benchmark) with no launcher: a world of one.
    MASTER_PORT 0: the rendezvous store binds a free port itself, so no other process can take it
    between choosing and binding."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
