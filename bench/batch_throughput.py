"""Images per second of `sdtorch batch` on the embedded model: in-process, and on Ray with 1 and 2 workers.

    python bench/batch_throughput.py [--images 12] [--steps 20] [--no-ray]

Each configuration makes the same job into its own empty folder through the real driver (`run_job`:
PNGs, manifest, fsyncs). Two rates are printed: over the whole run (model loading and Ray actor start
included) and steady (from the first image written to the last). Ray runs on a local cluster of all
this machine's CPUs, started here. Prints a JSON line per configuration, then the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def measure(label: str, images, backend, folder: Path) -> dict:
    from sdtorch.batch import run_job

    stamps = []
    counts = run_job(images, folder, backend, quiet=True, on_written=lambda record: stamps.append(time.perf_counter()))
    assert counts["written"] == len(images), counts
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"config": label, "images": len(images), "seconds": round(counts["seconds"], 2),
            "images_per_s": round(len(images) / counts["seconds"], 3), "steady_images_per_s": round(steady, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-ray", action="store_true", help="in-process only")
    args = parser.parse_args()

    import torch

    from sdtorch.batch import JobSpec, LocalBackend, read_job
    from sdtorch.metadata import model_hash
    from sdtorch.pipeline import default_model_path
    from sdtorch.request import GenerationRequest

    model = str(default_model_path())
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.txt"
        job.write_text("a red circle on a blue background\na green square\na yellow triangle on white\n")
        per_line = -(-args.images // 3)
        spec = JobSpec(base=GenerationRequest(steps=args.steps), seeds=list(range(per_line)),
                       identity={"model": model_hash(model)})
        images = read_job(job, spec)[0][: args.images]
        options = {"model": model}
        rows = [measure(f"in-process, 1 worker, {torch.get_num_threads()} threads", images, LocalBackend(options),
                        Path(tmp) / "local")]
        if torch.get_num_threads() > 1:
            threads = torch.get_num_threads()
            rows.append(measure("in-process, 1 worker, 1 thread", images, LocalBackend({**options, "threads": 1}),
                                Path(tmp) / "local1"))
            torch.set_num_threads(threads)
        if not args.no_ray:
            import ray

            from sdtorch.batch.ray_backend import RayBackend

            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, _temp_dir=str(Path(tmp) / "ray"))
            try:
                rows.append(measure(f"ray, 1 worker x {cores} CPUs", images,
                                    RayBackend(options, workers=1, cpus_per_worker=cores), Path(tmp) / "ray1"))
                rows.append(measure(f"ray, 2 workers x {max(1, cores // 2)} CPU", images,
                                    RayBackend(options, workers=2, cpus_per_worker=max(1, cores // 2)),
                                    Path(tmp) / "ray2"))
            finally:
                ray.shutdown()
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"cpu": cpu_name(), "cores": cores, "capability": torch.backends.cpu.get_cpu_capability(),
                      "torch": torch.__version__, "steps": args.steps, "size": "64x64 (embedded model)"}))


if __name__ == "__main__":
    main()
