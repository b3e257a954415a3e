"""One process of a multi-task SLURM job: rank, world size and the main address from the job's environment.

A job with several tasks (``srun`` in an ``sbatch`` script, or ``hydra/launcher=mole_slurm`` with
``nodes > 1`` or ``tasks_per_node > 1``) runs ``mole-train`` once per task. Each task is one process of
the run, one per GPU: it reads ``SLURM_PROCID`` (global rank), ``SLURM_NTASKS`` (world size),
``SLURM_LOCALID`` (rank on its node), ``SLURM_NTASKS_PER_NODE`` and ``SLURM_JOB_NODELIST`` (the first
node hosts the rendezvous), sets the variables ``torch.distributed`` reads (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and trains directly, without
``accelerate launch``. The port is ``distributed.main_process_port``, or one derived from the job id so
every task picks the same. A job with one task keeps the usual path (``accelerate launch`` inside it).

One writer. Every task runs the same job function, and under ``mole-train -m`` (Hydra's submitit launcher)
every task runs Hydra's ``run_job`` too, which would write ``.hydra/`` and open the job's log file in the run
directory. Only task 0 writes there: ``conf/train.yaml`` sets ``hydra.output_subdir`` and the log file's name
through the resolver ``${mole_writer:VALUE,OTHERWISE}`` (:func:`writer_value`), which gives ``OTHERWISE``
(``null``, ``/dev/null``) in any other task, and a sweep job's record is task 0's (:mod:`mole.cli.train`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mole.utils.errors import MoleConfigError


@dataclass(frozen=True)
class SlurmTask:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    main_address: str
    job_id: int

    def default_port(self) -> int:
        return 20000 + self.job_id % 20000

    def export(self, port: int | None) -> None:
        """Set the variables torch.distributed and Accelerate read to join the job's process group."""
        os.environ.update({
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.main_address,
            "MASTER_PORT": str(port or self.default_port()),
        })


def _first_host(node_list: str) -> str:
    try:  # submitit parses SLURM's compressed lists (node[01-04],gpu7)
        from submitit.slurm.slurm import _parse_node_list

        return _parse_node_list(node_list)[0]
    except ImportError:
        first = node_list.split(",")[0]
        if "[" in first:
            raise MoleConfigError(
                f"SLURM_JOB_NODELIST={node_list!r}: reading it needs submitit (pip install 'mole[slurm]')"
            ) from None
        return first


def slurm_task() -> SlurmTask | None:
    """This task of a SLURM job with several tasks, or ``None`` (no such job, or already a rank of a run
    started by ``accelerate launch`` / torchrun inside one)."""
    env = os.environ
    if "SLURM_PROCID" not in env or "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        return None
    try:
        world = int(env.get("SLURM_NTASKS", "1"))
        if world <= 1:
            return None
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0].split(",")[0]
        local_world = int(per_node) if per_node else max(1, world // max(nodes, 1))
        return SlurmTask(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", "0")),
                         world_size=world, local_world_size=local_world,
                         main_address=_first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                         job_id=int(env.get("SLURM_JOB_ID", "0")))
    except ValueError as err:
        raise MoleConfigError(f"the SLURM job's environment is not readable: {err}") from None


def writes_run_dir() -> bool:
    """Whether this process may write the run directory: not a SLURM task other than task 0, and not a rank
    other than 0 of a launched run (a SLURM task is one once it has joined the run's process group)."""
    task = slurm_task()
    if task is not None:
        return task.rank == 0
    return "LOCAL_RANK" not in os.environ or os.environ.get("RANK", "0").strip() in ("", "0")


def writer_value(value, otherwise=None):
    """The resolver ``${mole_writer:VALUE,OTHERWISE}``: ``VALUE`` where :func:`writes_run_dir`, else ``OTHERWISE``."""
    return value if writes_run_dir() else otherwise
