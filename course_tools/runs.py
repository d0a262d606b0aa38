"""Training-run plumbing that no lesson reads: atomic saves, the run-folder lock, checkpoints and
resuming, the processes of a torchrun job. course_tools.training uses it around the course module's
training loop (diffusion_utilities.train), which notebook 3 teaches.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import torch

from course_tools.hardware import describe_device


def write_atomic(path, data):
    """Write bytes or text to a temporary file beside path, then rename it over path: a crash never leaves a
    half-written file, and a reader sees the old file or the new one. The one writer the tools use."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    try:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed
    return path


def save_atomic(obj, path):
    """torch.save through write_atomic. The bytes depend on obj alone: torch.save records the file's name
    inside the file, so it saves to a buffer, not under the temporary name. Exporting the same weights
    again gives the same sha256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_atomic(path, buffer.getvalue())


def weights_payload(model, half=False):
    """What ema.pt and snapshots hold: {"model_args": model.settings, "state_dict": ...}; half=True stores
    floats as fp16 (half the file size, the same samples)."""
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return {"model_args": dict(model.settings), "state_dict": state}


class RunLock:
    """out_dir/LOCK, holding the owner's process id, for as long as a training runs in out_dir.

    A second training on the same folder stops at once with a message naming the first, instead of
    both writing the same checkpoint. A lock left by a process that no longer runs is taken over.
    """

    def __init__(self, out_dir):
        self.path = Path(out_dir) / "LOCK"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and process_alive(pid):
                    raise RuntimeError(f"{self.path.parent} is in use by training process {pid}; wait for it to "
                                       "finish, stop it, or choose another output folder") from None
                self.path.unlink(missing_ok=True)  # stale: its process has gone
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def process_alive(pid):
    """Whether a process with this id runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def distributed(device):
    """(rank, world size, device) for data-parallel training under torchrun; (0, 1, device) otherwise.

    torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; each process joins
    the group (gloo on CPUs, NCCL on GPUs) and draws its own part of every batch (batch_size / world size)
    with its own generator; DistributedDataParallel averages the gradients, so the global batch and the
    learning rate mean what they mean in one process. BatchNorm: on GPUs it becomes SyncBatchNorm (whole-
    batch statistics); on CPUs each process normalises with its own part's statistics (PyTorch's
    SyncBatchNorm takes GPU tensors only), and the running statistics are rank 0's; GroupNorm (--norm group) is unaffected.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def wait_for_all(world):
    """Hold every process here until all have arrived (nothing in one process). A run ends with it, so
    that no process leaves the group while rank 0 is still writing the run's files."""
    if world == 1:
        return
    import torch.distributed as dist

    dist.barrier()


def end_distributed():
    """Leave the torchrun process group, if this process joined one: without it a process can abort at
    exit while the group's background threads still run (seen as SIGABRT, "terminate called without an
    active exception"). Seen once more in CI with it, in the process that had finished first and left while
    rank 0 was still writing its checkpoint: hence wait_for_all before it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_mean(value, world):
    """The mean of a float over all processes (the value itself in one process)."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def all_generator_states(gen, world):
    """Every process's generator state, in rank order (a checkpoint holds them all)."""
    if world == 1:
        return [gen.get_state()]
    import torch.distributed as dist

    states = [None] * world
    dist.all_gather_object(states, gen.get_state())
    return states


class RunState:
    """Where a run stands (step, loss history, training seconds) and its files: checkpoint.pt,
    history.json and snapshots. A checkpoint holds everything needed to continue bit-exactly."""

    def __init__(self, out_dir, config, data, device, rank=0, world=1):
        self.out_dir, self.config, self.data, self.device = Path(out_dir), config, data, device
        self.rank, self.world = rank, world
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.step, self.history, self.saved_step = 0, [], "none yet"
        self.t_start = time.time()

    def resume(self, model, ema, opt, gen):
        if not self.ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}; start without --resume")
        # onto the CPU: the generators' states must stay there, and load_state_dict moves weights and
        # optimiser state to the model's device
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        # Only the length may change on resume (to train longer or stop sooner); the learning-rate
        # schedule is then re-planned from the current step.
        saved = {"objective": "diffusion", **ck["config"]}  # checkpoints from before notebook 8 name no objective
        changed = [f"{k}={saved.get(k)!r} in the checkpoint, now {v!r}"
                   for k, v in self.config.__dict__.items() if k != "steps" and saved.get(k) != v]
        if ck.get("data_sha256", self.data.digest) != self.data.digest:
            changed.append(f"--data: the checkpoint trained on {ck.get('data_path')}, now {self.data.path} "
                           "(different contents)")
        if ck.get("world_size", 1) != self.world:
            changed.append(f"{ck.get('world_size', 1)} process(es) in the checkpoint, now {self.world} (each draws "
                           "its own part of every batch)")
        if changed:
            raise ValueError("--resume: the checkpoint was made with other settings: " + "; ".join(changed)
                             + ". Resume with the same settings, or start a new run in another --out.")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck.get("generators", [ck["generator"]])[self.rank])
        torch.set_rng_state(ck["rng"]["torch"])
        self.step, self.history, self.saved_step = ck["step"], list(ck["history"]), ck["step"]
        self.t_start = time.time() - ck.get("train_seconds", 0.0)

    def save_checkpoint(self, model, ema, opt, generator_states):
        if self.rank > 0:  # every process holds the same weights; one writes them
            self.saved_step = self.step
            return
        seconds = time.time() - self.t_start
        save_atomic({"config": self.config.__dict__, "model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": opt.state_dict(), "generator": generator_states[0],
                     "generators": generator_states, "world_size": self.world,
                     "rng": {"torch": torch.get_rng_state()}, "step": self.step, "history": self.history,
                     "train_seconds": seconds, "data_path": str(self.data.path), "data_sha256": self.data.digest,
                     "model_args": dict(model.settings), "class_names": self.data.class_names,
                     "schedule": self.config.schedule_args()},
                    self.ckpt_path)
        write_atomic(self.out_dir / "history.json", json.dumps({"loss": self.history, "train_seconds": seconds,
                                                                "device": describe_device(self.device)}))
        self.saved_step = self.step

    def save_snapshot(self, ema_model):
        save_atomic({**weights_payload(ema_model, half=True), "step": self.step, "class_names": self.data.class_names,
                     "schedule": self.config.schedule_args(),
                     "train_seconds": time.time() - self.t_start}, self.out_dir / f"snap_{self.step:06d}.pt")
