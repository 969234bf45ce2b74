"""`sdtorch batch`: job files, every image once and equal to `generate`'s, resumable after SIGKILL, and on Ray.

The images come from the embedded model at 4 steps. Torch's CPU results depend on its thread count (a pixel
here and there differs between 1 and 2 threads), so every process that makes an image here runs with one
thread: the batch and generate subprocesses through OMP_NUM_THREADS=1, the Ray workers through
--cpus-per-worker 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sdtorch.batch import JobSpec, read_job
from sdtorch.batch.jobs import JobFileError, a1111_line, parse_seeds, parse_sweep
from sdtorch.cli import REQUEST_OPTIONS
from sdtorch.request import GenerationRequest


def env() -> dict:
    """This process's environment (after ray.init: its RAY_AUTH_MODE, so a driver can join), one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}

STEPS = "4"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "sdtorch.cli", *args], env=env(), capture_output=True, text=True,
                          timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def assert_complete(folder: Path, expected: int) -> list[dict]:
    """Every image once, whole, and named by exactly one manifest line that matches its bytes."""
    records = manifest(folder)
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert len(records) == expected == len(pngs)
    assert sorted(r["file"] for r in records) == pngs
    assert len({r["key"] for r in records}) == expected
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]
    for r in records:
        data = (folder / r["file"]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data.endswith(b"IEND\xaeB`\x82")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (r["bytes"], r["sha256"])
    return records


def assert_equals_generate(folder: Path, record: dict, tmp: Path) -> None:
    """The image equals `sdtorch generate` run with its request's options, byte for byte."""
    request = record["request"]
    args = [request["prompt"], "--steps", str(request["steps"]), "--seed", str(request["seed"]),
            "--out", str(tmp / f"generate-{record['key']}.png"), "--quiet"]
    if request["negative_prompt"]:
        args += ["--negative", request["negative_prompt"]]
    if request["cfg_scale"] is not None:
        args += ["--cfg", str(request["cfg_scale"])]
    if request["sampler"] != "euler_a":
        args += ["--sampler", request["sampler"]]
    cli("generate", *args)
    assert (tmp / f"generate-{record['key']}.png").read_bytes() == (folder / record["file"]).read_bytes(), record


def run_then_kill(command: list[str], out: Path, after: int, total: int) -> list[dict]:
    """Start a batch, SIGKILL it once its manifest has `after` lines; what it left must be whole."""
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "manifest.jsonl").exists() and (out / "manifest.jsonl").read_bytes().count(b"\n") >= after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    first = manifest(out)
    assert after <= len(first) < total
    for r in first:  # what the killed run recorded is whole
        assert (out / r["file"]).read_bytes().endswith(b"IEND\xaeB`\x82")
    return first


# ---------------------------------------------------------------------------------------------
# Job files, without a model.


def spec(**kw) -> JobSpec:
    return JobSpec(base=GenerationRequest(steps=4), **kw)


def test_a1111_lines_read_as_a1111_reads_them():
    fields, n_iter = a1111_line('--prompt a red circle --negative_prompt "blurry, dark" --steps 20 --seed 5 '
                                '--cfg_scale 6.5 --sampler_name "DPM++ 2M Karras" --batch_size 2 --n_iter 3 '
                                '--width 64 --height 64 --do_not_save_grid true --tiling false', "diffusers")
    assert fields == {"prompt": "a red circle", "negative_prompt": "blurry, dark", "steps": 20, "seed": 5,
                      "cfg_scale": 6.5, "sampler": "dpmpp_2m", "schedule": "karras", "batch": 2, "width": 64,
                      "height": 64}
    assert n_iter == 3
    fields, _ = a1111_line("--prompt x --subseed 9 --subseed_strength 0.5 --seed_resize_from_w 96 "
                           "--seed_resize_from_h 80 --seed -1", "a1111")
    assert fields == {"prompt": "x", "variation_seed": 9, "variation_strength": 0.5, "seed_resize_from": (96, 80)}


def test_expansion_seeds_per_prompt_and_sweeps(tmp_path):
    job = tmp_path / "job.txt"
    job.write_text("a cat\n\n--prompt a dog --seed 100 --n_iter 2\n")
    images, duplicates = read_job(job, spec(seeds=parse_seeds("0-2,7")))
    assert [(i.line, i.request.prompt, i.request.seed) for i in images] == [
        (1, "a cat", 0), (1, "a cat", 1), (1, "a cat", 2), (1, "a cat", 7), (3, "a dog", 100), (3, "a dog", 101)]
    assert duplicates == 0 and all(i.request.batch == 1 for i in images)

    images, _ = read_job(job, spec(per_prompt=2, sweeps=(parse_sweep("cfg=3,5", REQUEST_OPTIONS),
                                                         parse_sweep("steps=2,4", REQUEST_OPTIONS))))
    got = [(i.request.prompt, i.request.seed, i.request.cfg_scale, i.request.steps) for i in images]
    assert len(got) == 2 * 4 + 4 * 4 and len(set(got)) == len(got)
    assert got[:4] == [("a cat", 0, 3.0, 2), ("a cat", 1, 3.0, 2), ("a cat", 0, 3.0, 4), ("a cat", 1, 3.0, 4)]
    assert {g[1] for g in got if g[0] == "a dog"} == {100, 101, 102, 103}
    # Stable names: the same job gives the same names, a different request a different one.
    again, _ = read_job(job, spec(per_prompt=2, sweeps=(parse_sweep("cfg=3,5", REQUEST_OPTIONS),
                                                        parse_sweep("steps=2,4", REQUEST_OPTIONS))))
    assert [i.name for i in again] == [i.name for i in images]
    assert len({i.name for i in images}) == len(images)


def test_json_lines_and_duplicates(tmp_path):
    job = tmp_path / "job.jsonl"
    job.write_text('{"prompt": "a", "seed": 3, "cfg_scale": 5}\n{"prompt": "a", "seed": 3, "cfg_scale": 5.0}\n'
                   '{"prompt": "b", "compat": "a1111", "sampler": "dpmpp_2m"}\n')
    images, duplicates = read_job(job, spec())
    assert duplicates == 1 and [(i.request.prompt, i.request.seed) for i in images] == [("a", 3), ("b", 0)]
    assert images[1].request.schedule == "automatic"  # as generate --compat a1111


def test_bad_lines_are_each_reported_with_their_number(tmp_path):
    job = tmp_path / "bad.txt"
    job.write_text('a fine prompt\n--prompt x --steps many\n--prompt y --no_such_option 3\n'
                   '--prompt z --sampler_name "Nope"\n--prompt "unclosed\n--prompt w --width 65\n')
    with pytest.raises(JobFileError) as caught:
        read_job(job, spec())
    assert [p.split(":")[1] for p in caught.value.problems] == ["2", "3", "4", "5", "6"]
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": "b", "cfg": 5}\n{"prompt": "c", "steps": 0}\nnot json\n')
    with pytest.raises(JobFileError) as caught:
        read_job(bad_json, spec())
    assert [p.split(":")[1] for p in caught.value.problems] == ["2", "3", "4"]


def test_cli_bad_job_exits_2_and_writes_nothing(tmp_path):
    job = tmp_path / "bad.txt"
    job.write_text("--prompt a --steps 2\n--prompt b --steps two\n--prompt c --cfg_scale\nfine\n--seed 5 --bogus 1\n")
    out = tmp_path / "out"
    done = cli("batch", str(job), "--out", str(out), check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert [line.split(":")[3] for line in lines] == ["2", "3", "5"], lines
    assert all(line.startswith("sdtorch: error: bad.txt:") for line in lines)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# In-process runs.

# With --seeds 0-3: 4 images of line 1, line 2 at its own seeds 40-43, 4 of line 3: 12.
JOB = ('a red circle on a blue background\n'
       '--prompt "a green square" --negative_prompt "red" --seed 40 --n_iter 4\n'
       '--prompt a yellow triangle --cfg_scale 6 --sampler_name "DPM++ 2M"\n')


def test_in_process_job_killed_then_resumed_equals_generate(tmp_path):
    job = tmp_path / "job.txt"
    job.write_text(JOB)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sdtorch.cli", "batch", str(job), "--out", str(out), "--steps", STEPS,
               "--seeds", "0-3", "--quiet"]
    first = run_then_kill(command, out, after=4, total=12)

    done = cli("batch", str(job), "--out", str(out), "--steps", STEPS, "--seeds", "0-3", "--quiet")
    assert f"({len(first)} already there, {12 - len(first)} made" in done.stdout, done.stdout
    records = assert_complete(out, 12)
    assert records[: len(first)] == first  # kept as they were, not made again
    assert {r["worker"].split("@")[0] for r in records} == {"local"}

    # A PNG whose manifest line was lost (killed between rename and append), a half-written line and a
    # stray temporary file: the PNG is made again (same bytes), the manifest repaired.
    lost = records[5]
    kept = [json.dumps(r) for r in records if r is not lost]
    (out / "manifest.jsonl").write_text("\n".join(kept) + "\n" + '{"file": "half')
    (out / f".{lost['file']}.123.partial").write_bytes(b"\x89PNG half")
    before = (out / lost["file"]).read_bytes()
    done = cli("batch", str(job), "--out", str(out), "--steps", STEPS, "--seeds", "0-3", "--quiet")
    assert "(11 already there, 1 made" in done.stdout, done.stdout
    assert_complete(out, 12)
    assert (out / lost["file"]).read_bytes() == before

    for record in (records[5], records[10]):  # a negative prompt; another sampler and CFG (line 1: Ray's test)
        assert_equals_generate(out, record, tmp_path)


# ---------------------------------------------------------------------------------------------
# On Ray: one local cluster for the module.


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # 127.0.0.1 only: conftest sets Ray's single-machine mode before ray is imported
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def ray_job(tmp_path: Path, text: str, *extra: str):
    from sdtorch.batch import job_spec
    from sdtorch.cli import build_parser

    job = tmp_path / "job.txt"
    job.write_text(text)
    args = build_parser().parse_args(["batch", str(job), "--out", str(tmp_path / "out"), "--steps", STEPS, *extra])
    images, _ = read_job(job, job_spec(args))
    return images, args


def test_ray_two_workers_driver_killed_then_resumed_equals_generate(tmp_path, ray_cluster):
    """24 images over 2 workers, the driver (`sdtorch batch --ray ADDRESS`) SIGKILLed half-way, then rerun."""
    job = tmp_path / "job.txt"
    job.write_text(JOB + "a small circle\n--prompt a big square --seed 3 --batch_size 2\n")  # 6 + 4 + 6 + 6 + 2
    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    command = ["batch", str(job), "--out", str(out), "--steps", STEPS, "--seeds", "10-15", "--ray", address,
               "--workers", "2", "--quiet"]
    first = run_then_kill([sys.executable, "-m", "sdtorch.cli", *command], out, after=6, total=24)
    done = cli(*command)
    assert f"({len(first)} already there, {24 - len(first)} made" in done.stdout, done.stdout
    records = assert_complete(out, 24)
    assert records[: len(first)] == first
    assert {r["worker"].split("@")[0] for r in records} == {"ray-0", "ray-1"}
    assert all(r["worker"].endswith("/1t") for r in records)
    for record in (records[3], records[22]):
        assert_equals_generate(out, record, tmp_path)


def test_ray_worker_killed_mid_job_still_completes(tmp_path, ray_cluster):
    from sdtorch.batch import run_job, worker_options
    from sdtorch.batch.ray_backend import RayBackend

    images, args = ray_job(tmp_path, JOB, "--seeds", "20-25")
    assert len(images) == 16
    backend = RayBackend(worker_options(args), workers=2)
    killed = []

    def kill(record: dict) -> None:
        # After 3 images: SIGKILL the process of the worker that made the third (Ray restarts it and retries
        # its requests). After 8: end the other for good (its requests must go to the survivor).
        kill.count += 1
        if kill.count == 3:
            killed.append(record["worker"].split("@")[0])
            os.kill(int(record["worker"].split(":")[1].split("/")[0]), signal.SIGKILL)
        elif kill.count == 8:
            other = 1 - int(killed[0].split("-")[1])
            ray_cluster.kill(backend.actors[other], no_restart=True)
            killed.append(f"ray-{other}")

    kill.count = 0
    counts = run_job(images, args.out, backend, quiet=True, on_written=kill)
    assert (counts["written"], counts["failed"]) == (16, 0)
    records = assert_complete(Path(args.out), 16)
    workers = [r["worker"] for r in records]
    assert len(set(w.split("@")[1] for w in workers if w.startswith(killed[0] + "@"))) == 2  # restarted: a new pid
    assert workers[-1].split("@")[0] != killed[1]
    assert backend.resubmitted >= 1  # the requests in flight on the actor ended for good were made elsewhere
    assert_equals_generate(Path(args.out), records[-1], tmp_path)
