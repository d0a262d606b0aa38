"""Progressive distillation behind `python diffusion_utilities.py distill` (notebook 9).

The lesson's pieces live in the module (du.distillation_target, du.distillation_times, du.distill_loss) and the
loop is notebook 3's du.train with loss_fn=du.distill_loss. This file adds what a run of several rounds needs:

- DistillConfig: the checked settings, saved in every checkpoint (a resume with other settings is refused);
- rounds: a shipped teacher (checked against its manifest sha256) sampled with `teacher_steps` DDIM calls
  teaches a student with half as many, which then teaches the next, down to one call;
- contexts: the real class mix, plus blends of classes (so the one-call widget's sliders land on something
  the student was taught) and dropped contexts (unguided);
- checkpoints every `checkpoint_every` updates, exact resume, a run lock, and each round's student saved as a
  self-describing weights file (studentN.pt: model_args, schedule, class names, and "distilled": its calls,
  guidance weight and teacher), which du.load_model reads;
- export into weights/ (only with --to-weights) with a manifest entry per student.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import diffusion_utilities as du
from course_tools.hardware import describe_device, fast_settings
from course_tools.manifest import add_to_manifest
from course_tools.runs import RunLock, save_atomic, weights_payload, write_atomic
from course_tools.training import TrainingData


@dataclass
class DistillConfig:
    """Everything that defines a distillation run; saved in every checkpoint."""
    teacher: str = "sprites"      # a name in weights/manifest.json (a v-predicting diffusion model)
    teacher_steps: int = 8        # the teacher's DDIM calls; rounds halve them down to 1
    updates: tuple = (1200,)      # optimiser steps per round: one number for every round, or one per round
    batch_size: int = 64
    lr: float = 2e-4
    lr_min: float = 1e-5
    warmup: int = 20
    ema_decay: float = 0.995
    guide_w: float = 2.0          # the teacher's guidance, which the students learn to give in one pass
    blend_prob: float = 0.2       # share of a batch whose context is a random blend of classes
    drop_prob: float = 0.1        # share of a batch with no context
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        self.updates = tuple(int(u) for u in (self.updates if isinstance(self.updates, (list, tuple)) else [self.updates]))
        n = self.teacher_steps
        if not isinstance(n, int) or n < 2 or n & (n - 1):
            raise ValueError(f"teacher_steps must be a power of two >= 2 (each round halves it), got {n!r}")
        if len(self.updates) not in (1, len(self.rounds())) or min(self.updates, default=0) < 1:
            raise ValueError(f"updates: one positive number, or one per round ({len(self.rounds())} rounds: "
                             f"students of {self.rounds()} calls), got {list(self.updates)}")
        for name in ("batch_size", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < self.lr_min <= self.lr:
            raise ValueError(f"need 0 < lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        for name in ("blend_prob", "drop_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.guide_w) and self.guide_w >= 0):
            raise ValueError(f"guide_w must be a finite number >= 0, got {self.guide_w}")

    def rounds(self):
        """The students' calls, one per round: teacher_steps / 2, / 4, ..., 1."""
        return [self.teacher_steps >> k for k in range(1, int(math.log2(self.teacher_steps)) + 1)]

    def updates_in(self, r):
        return self.updates[r] if len(self.updates) > 1 else self.updates[0]


def blended_contexts(batches, *, blend_prob, generator):
    """The batches (x, one-hot c) with a share blend_prob of the contexts replaced by random blends of the
    classes (Dirichlet(1/2) weights: normalised squares of normal draws), as notebook 5's mixed contexts and the widget make."""
    for x, c in batches:
        pick = torch.rand(len(c), generator=generator) < blend_prob
        if pick.any():
            w = torch.randn(int(pick.sum()), c.shape[1], generator=generator) ** 2  # Gamma(1/2) draws, up to scale
            c = c.clone()
            c[pick] = (w / w.sum(1, keepdim=True)).to(c.dtype)
        yield x, c


def student_file(out_dir, n_steps):
    return Path(out_dir) / f"student{n_steps}.pt"


def load_teacher(config, weights_dir=du.WEIGHTS_DIR):
    """The shipped teacher, its sha256 checked (a damaged or changed file is refused), and its schedule."""
    teacher = du.load_pretrained(config.teacher, "cpu", weights_dir=weights_dir)
    if teacher.prediction != "v":
        raise ValueError(f"{config.teacher!r} predicts {teacher.prediction!r}; distillation needs a v-predicting "
                         "diffusion model such as 'sprites'")
    return teacher, du.model_schedule(teacher)


def run_distillation(config, out_dir, *, data_path=du.DATA_FILE, resume=False, weights_dir=du.WEIGHTS_DIR,
                     progress=True, fast=True):
    """Every round of config, in out_dir: run.json (the settings, the teacher's sha256, the data's digest, the
    hardware), checkpoint.pt while a round runs, studentN.pt when it ends. Returns {calls: minutes} of the rounds.
    A used out_dir needs resume=True, and a resume must name the same settings, teacher and data."""
    out_dir = Path(out_dir)
    ckpt_path, run_path = out_dir / "checkpoint.pt", out_dir / "run.json"
    finished = all(student_file(out_dir, n).exists() for n in config.rounds()) and not ckpt_path.exists()
    if not resume and run_path.exists():
        raise FileExistsError(f"{out_dir} already holds a distillation run" + (
            "; it has finished: copy its students with --export" if finished else
            "; pass --resume to continue it") + ", or choose another --out")
    if resume and not run_path.exists():
        raise FileNotFoundError(f"--resume: no distillation run in {out_dir}; start without --resume")
    teacher0, schedule = load_teacher(config, weights_dir)
    if config.teacher_steps > schedule.T:
        raise ValueError(f"--teacher-steps {config.teacher_steps} is more than the teacher's {schedule.T} steps")
    data = TrainingData(data_path)
    images, labels, class_names = data.images, data.labels, data.class_names
    if images.shape[1] != teacher0.height or data.n_classes != teacher0.n_cfeat:
        raise ValueError(f"{data_path} has {images.shape[1]}x{images.shape[1]} images in {data.n_classes} classes; "
                         f"the teacher {config.teacher!r} draws {teacher0.height}x{teacher0.height} in {teacher0.n_cfeat}")
    made = {"config": asdict(config), "teacher_sha256": du.checked_entry(config.teacher, weights_dir)[1]["sha256"],
            "data_sha256": data.digest, "hardware": describe_device("cpu")}
    with RunLock(out_dir):
        if resume:
            _check_same_run(json.loads(run_path.read_text()), made)
        else:
            write_atomic(run_path, json.dumps(made, indent=1))
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.exists() else None
        minutes = {}
        for r, n_steps in enumerate(config.rounds()):
            path = student_file(out_dir, n_steps)
            if path.exists():
                minutes[n_steps] = torch.load(path, map_location="cpu", weights_only=True)["train_seconds"] / 60
                continue
            teacher = teacher0 if r == 0 else du.load_model(student_file(out_dir, 2 * n_steps), "cpu")
            minutes[n_steps] = _round(config, r, teacher, schedule, images, labels, class_names, out_dir,
                                      state if state and state["round"] == r else None, progress, fast)
            state = None
        ckpt_path.unlink(missing_ok=True)
        return minutes


def _check_same_run(saved, now):
    """A resume continues the same run: the same settings, the same teacher file and the same data."""
    now_config = json.loads(json.dumps(now["config"]))  # as run.json holds it (tuples become lists)
    changed = [f"{k}={saved['config'].get(k)!r} in the run, now {v!r}" for k, v in now_config.items()
               if saved["config"].get(k) != v]
    changed += [f"the {what} changed since the run began" for what, key in (("teacher's weights", "teacher_sha256"),
                                                                          ("data", "data_sha256"))
                if saved[key] != now[key]]
    if changed:
        raise ValueError("--resume: " + "; ".join(changed) + ". Resume with the same settings, or start a new "
                         "run in another --out.")


def _round(config, r, teacher, schedule, images, labels, class_names, out_dir, state, progress, fast):
    """One round: a student initialised from its teacher learns the teacher's two steps in one."""
    n_steps, updates = config.rounds()[r], config.updates_in(r)
    student = copy.deepcopy(teacher).train()
    student.distilled = {}
    if fast:  # bf16 where the CPU has it natively: about 2x on this course's 2-core CPU
        teacher.autocast_dtype = student.autocast_dtype = fast_settings("cpu")[0]
    gen = torch.Generator().manual_seed(config.seed * 1000 + r)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    ema = du.EMA(student, decay=config.ema_decay, warmup=10)
    start, history, seconds = 0, [], 0.0
    if state is not None:
        student.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        start, history, seconds = state["update"], list(state["history"]), state["train_seconds"]
    t0 = time.time() - seconds
    batches = blended_contexts(du.sprite_batches(images, labels, batch_size=config.batch_size, generator=gen,
                                                 n_cfeat=teacher.n_cfeat),
                               blend_prob=config.blend_prob, generator=gen)

    def save(update):
        save_atomic({"config": asdict(config), "round": r, "update": update, "model": student.state_dict(),
                     "model_args": dict(student.settings), "schedule": dict(getattr(teacher, "schedule_args", {})),
                     "class_names": list(class_names),
                     "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                     "rng": torch.get_rng_state(), "history": history, "train_seconds": time.time() - t0},
                    out_dir / "checkpoint.pt")

    def callback(update, loss):
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at update {update} of the {n_steps}-call round; "
                                     f"resume from the last checkpoint (every {config.checkpoint_every} updates) "
                                     "with a lower --lr")
        history.append(loss)
        if update % config.checkpoint_every == 0 and update < updates:
            save(update)

    du.train(student, batches, schedule, steps=updates, lr=config.lr, lr_min=config.lr_min, warmup=config.warmup,
             ema=ema, optimizer=optimizer, start=start, callback=callback, progress=progress,
             loss_fn=du.distill_loss, teacher=teacher, n_steps=n_steps,
             guide_w=config.guide_w if r == 0 else 0.0,  # a student teacher gives the guided result in one pass
             drop_prob=config.drop_prob, generator=gen)
    seconds = time.time() - t0
    final = ema.model
    final.autocast_dtype = None
    save_atomic({**weights_payload(final), "class_names": list(class_names),
                 "schedule": dict(getattr(teacher, "schedule_args", {})), "train_seconds": seconds,
                 "history": history, "distilled": {"steps": n_steps, "guide_w": config.guide_w,
                                                   "teacher": config.teacher}},
                student_file(out_dir, n_steps))
    print(f"student of {n_steps} call(s): {updates} updates in {seconds / 60:.1f} min, last-100 mean loss "
          f"{np.mean(history[-100:]):.5f}", flush=True)
    return seconds / 60


def export_students(out_dir, wdir, *, command, ship=(4, 2, 1)):
    """Copy a finished run's students of `ship` calls into wdir as {teacher}_studentN.pt (fp16: half the size, the
    same samples), each with a manifest entry that records how the run was made (its run.json, not today's flags);
    their loss curves (every 10th update) go to {teacher}_student_loss.json beside what is there."""
    out_dir = Path(out_dir)
    if not (out_dir / "run.json").exists():
        raise ValueError(f"--export: no distillation run in {out_dir}")
    made = json.loads((out_dir / "run.json").read_text())
    config = DistillConfig(**made["config"])
    if not set(ship) <= set(config.rounds()):
        raise ValueError(f"--export: this run makes students of {config.rounds()} calls, not {sorted(ship)}")
    missing = [n for n in config.rounds() if not student_file(out_dir, n).exists()]
    if missing or (out_dir / "checkpoint.pt").exists():
        raise ValueError(f"--export: {out_dir} has not finished (no student of {missing or 'its last round'} "
                         f"call(s) yet); finish it with `python diffusion_utilities.py distill --out {out_dir} --resume`")
    prefix = f"{config.teacher}_student"
    loss_path = Path(wdir) / f"{prefix}_loss.json"
    curves = json.loads(loss_path.read_text())["loss"] if loss_path.exists() else {}
    chain, total = {}, 0.0
    for n in config.rounds():  # a student needs every round above it: the chain's minutes down to it
        total += torch.load(student_file(out_dir, n), map_location="cpu", weights_only=True)["train_seconds"] / 60
        chain[n] = round(total, 1)
    for n in ship:
        data = torch.load(student_file(out_dir, n), map_location="cpu", weights_only=True)
        if not all(bool(torch.isfinite(v).all()) for v in data["state_dict"].values() if v.is_floating_point()):
            raise ValueError(f"--export: {student_file(out_dir, n)} holds NaN or inf weights; it is not shipped")
        name = f"{prefix}{n}"
        curves[str(n)] = [round(float(v), 5) for v in data["history"][::10]]
        payload = {k: v for k, v in data.items() if k != "history"}
        payload["state_dict"] = {k: (v.half() if v.is_floating_point() else v) for k, v in data["state_dict"].items()}
        save_atomic(payload, Path(wdir) / f"{name}.pt")
        add_to_manifest(name, f"{name}.pt", weights_dir=wdir, train_minutes=round(data["train_seconds"] / 60, 1),
                        chain_minutes=chain[n], command=command, seed=config.seed, config=made["config"],
                        hardware=made["hardware"], args=data["model_args"], class_names=data["class_names"],
                        schedule=data["schedule"], distilled=data["distilled"], teacher_sha256=made["teacher_sha256"])
    write_atomic(loss_path, json.dumps({"every": 10, "loss": curves}))
    print(f"exported students of {list(ship)} call(s) to {wdir}")
