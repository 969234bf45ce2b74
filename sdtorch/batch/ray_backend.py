"""The job's images on a Ray cluster: a pool of actors, each one `Worker` (one loaded pipeline).

The driver keeps every actor busy with a few requests in flight and takes results as they finish
(`ray.wait`); it writes the PNGs and the manifest itself, so DIR needs to exist only where the driver
runs. An actor that dies is restarted by Ray and its requests retried (max_restarts, max_task_retries);
once one has used its restarts, its requests go back to the queue for the others. Needs `sdtorch[ray]`
installed on every node (the actors import sdtorch).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator

from sdtorch.batch.jobs import JobImage
from sdtorch.batch.run import Worker
from sdtorch.errors import SdtorchError

IN_FLIGHT = 2  # requests queued on each actor, so that it never waits for the driver
MAX_RESTARTS = 2


def import_ray():
    try:
        import ray
    except ImportError:
        raise SdtorchError("--ray needs Ray: pip install 'sdtorch[ray]'") from None
    return ray


class RayBackend:
    def __init__(self, worker_options: dict, *, address: str = "auto", workers: int | None = None,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0):
        self.worker_options = worker_options
        self.address = address
        self.workers = workers
        self.cpus = cpus_per_worker
        self.gpus = gpus_per_worker
        self.actors: list = []  # the actor handles, once started (tests kill them)
        self.resubmitted = 0  # requests of actors that died for good, sent to another

    def _connect(self):
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            # "auto": the cluster RAY_ADDRESS or `ray start` names, else a new one on this machine.
            ray.init(address=None if self.address == "auto" else self.address, log_to_driver=False)
        return ray, started_here

    def _pool_size(self, ray) -> int:
        if self.workers:
            return self.workers
        resources = ray.cluster_resources()
        fits = [resources.get("CPU", 0) // self.cpus if self.cpus else float("inf")]
        if self.gpus:
            fits.append(resources.get("GPU", 0) // self.gpus)
        return max(1, int(min(fits)))

    def results(self, images: list[JobImage]) -> Iterator[tuple[JobImage, dict | SdtorchError]]:
        ray, started_here = self._connect()
        try:
            yield from self._run(ray, images)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            if started_here:
                ray.shutdown()

    def _run(self, ray, images: list[JobImage]) -> Iterator[tuple[JobImage, dict | SdtorchError]]:
        from ray.exceptions import RayActorError, RayTaskError

        remote = ray.remote(Worker).options(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=MAX_RESTARTS,
                                            max_task_retries=MAX_RESTARTS)
        options = dict(self.worker_options)
        if self.gpus and options.get("device", "auto") == "auto":
            options["device"] = "cuda"
        threads = max(1, int(self.cpus)) if not self.gpus else None  # as Ray's OMP_NUM_THREADS for the actor
        size = min(self._pool_size(ray), len(images))
        self.actors = [remote.remote(**options, threads=threads, name=f"ray-{i}") for i in range(size)]
        alive = set(range(size))
        load = dict.fromkeys(alive, 0)
        queue = deque(images)
        pending: dict = {}  # ObjectRef -> (image, actor index)

        def submit(index: int) -> None:
            image = queue.popleft()
            pending[self.actors[index].generate.remote(image.fields)] = (image, index)
            load[index] += 1

        for index in sorted(alive):
            for _ in range(IN_FLIGHT):
                if queue:
                    submit(index)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            image, index = pending.pop(ref)
            load[index] -= 1
            try:
                result = ray.get(ref)
            except RayActorError as e:  # the actor died and has used its restarts: the request goes to another
                if index in alive:
                    alive.discard(index)
                    print(f"sdtorch: note: Ray worker {index} died; its images go to the others", file=sys.stderr)
                if not alive:
                    last = (str(e).strip().splitlines() or [""])[-1]
                    raise SdtorchError(f"every Ray worker died (the last: {last}); see the Ray logs") from None
                queue.appendleft(image)
                self.resubmitted += 1
            except RayTaskError as e:
                cause = e.cause if hasattr(e, "cause") else None
                if isinstance(cause, SdtorchError):
                    yield image, SdtorchError(str(cause))
                else:
                    raise
            else:
                yield image, result
            while queue and alive:
                index = min(alive, key=lambda i: load[i])
                if load[index] >= IN_FLIGHT:
                    break
                submit(index)
