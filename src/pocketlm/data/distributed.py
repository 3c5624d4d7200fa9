"""The pipeline on Dask, for corpora beyond one machine.

Choice: Dask (`dask.distributed`) rather than Ray Data. The pipeline's unit of work is already a pure function
of (config, part) that reads and writes files on a shared filesystem, with the completion marker protocol for
resumption; what is needed from an engine is only "run these function calls on many workers, return results in
order". Dask's `Client.map`/`gather` is exactly that, is pure Python (pip-installable, no daemon of its own:
`dask scheduler` + `dask worker` on each machine, or dask-jobqueue on Slurm/PBS, dask-kubernetes), and a
`LocalCluster` of several processes starts in about a second, so the distributed path is tested locally. Ray
Data's strengths (streaming execution over an object store, GPU actors) are not used by this pipeline, and Ray's
runtime is much heavier to install and start on a 2-core machine. datatrove makes the same kind of choice
(executors for local processes, Slurm and Ray over the same pipeline steps).

Requirements for several machines: `cfg.out` and the source paths must be on a filesystem every worker sees
(NFS, Lustre, a FUSE-mounted bucket) with atomic rename; the client process runs the two sequential steps (dedup
decisions and the shard writer). The outputs are byte-identical to `pipeline.run`'s (tested), because both call
the same unit functions and the results are consumed in job order.
"""

from __future__ import annotations

import sys

from pocketlm.data.pipeline import PipelineConfig, _call, run


def dask_mapper(client, progress: bool = True):
    def mapper(jobs: list, desc: str) -> list:
        from distributed import as_completed
        from tqdm import tqdm

        futures = client.map(_call, jobs, pure=False)
        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not progress, file=sys.stderr,
                      leave=False):
            pass
        return client.gather(futures)
    return mapper


def run_distributed(cfg: PipelineConfig, *, address: str | None = None, n_workers: int = 2) -> dict:
    """Run the pipeline on the Dask scheduler at `address`, or on a LocalCluster of `n_workers` processes."""
    from distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            return run(cfg, mapper=dask_mapper(client, cfg.progress))
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        return run(cfg, mapper=dask_mapper(client, cfg.progress))
