"""Notebook 9's judge (issue 25): the shipped students (progressive distillation of `sprites`, guided w = 2) beside
their teacher at equal network calls.

    python -m research.distill_ship

Every row uses the same real sets and seeds as research/flow_ship.py (course_tools.metrics): sprite-FID, KID and
class accuracy of n = 1,000 samples made for the class ids of n random real sprites (the real class mix). The
teacher is sampled with guided DDIM (w = 2) at 1, 2, 4, 8, 16 and 25 calls; each student with DDIM at its own calls
and no further guidance (it learned the guided result). Writes research/distill_ship.json. Run it alone.

    python -m research.distill_ship --compare

is the method comparison behind the choice of progressive distillation, at a small equal budget: a one-call
student made (a) by progressive distillation from the teacher's DDIM-4 (two rounds, 4 -> 2 -> 1) and (b) by direct
distillation (Luhman & Luhman 2021; reflow's last step, Liu et al. 2023: the student learns to map the noise x_T
straight to the teacher's guided DDIM-4 sprite, one call from t = T) for the same CPU seconds. Adds "comparison"
to the JSON. And

    python -m research.distill_ship --record

writes each student's headline numbers from the JSON into its entry in weights/manifest.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import diffusion_utilities as du
from course_tools.distill import DistillConfig, blended_contexts, run_distillation, student_file
from course_tools.hardware import describe_device, fast_settings
from course_tools.manifest import record_metrics_in
from course_tools.metrics import frechet_distance, generate, load_classifier, real_sets, sample_scores

OUT = du.ROOT / "research" / "distill_ship.json"
TEACHER_CALLS = (1, 2, 4, 8, 16, 25)
STUDENTS = (4, 2, 1)
GUIDE_W = 2.0


def score(model, schedule, calls, guide_w, classifier, real_ref, gen_labels, seed):
    x, secs = generate(model, schedule, gen_labels, "ddim", calls, guide_w=guide_w, seed=seed, progress=False)
    return {"calls": calls, "s_per_sample": secs / len(gen_labels), **sample_scores(classifier, x, real_ref, gen_labels)}


def judge(args, classifier, images, labels):
    real_ref, real_other, gen_labels = real_sets(classifier, images, labels, args.n, args.seed)
    teacher = du.load_pretrained("sprites", "cpu")
    schedule = du.model_schedule(teacher)
    rows = []
    for calls in TEACHER_CALLS:
        rows.append({"model": "teacher", "guide_w": GUIDE_W,
                     **score(teacher, schedule, calls, GUIDE_W, classifier, real_ref, gen_labels, args.seed + 1)})
        print(json.dumps(rows[-1]), flush=True)
    for calls in STUDENTS:
        student = du.load_pretrained(f"sprites_student{calls}", "cpu")
        rows.append({"model": "student", "guide_w": 0.0,
                     **score(student, schedule, calls, 0.0, classifier, real_ref, gen_labels, args.seed + 1)})
        print(json.dumps(rows[-1]), flush=True)
    return {"n": args.n, "seed": args.seed, "guide_w": GUIDE_W, "floor_fid": frechet_distance(real_other, real_ref),
            "rows": rows}


def direct_distillation(teacher, schedule, images, labels, *, seconds, teacher_calls=4, batch_size=64, lr=2e-4, seed=0):
    """A one-call student trained for `seconds` to map x_T to the teacher's guided DDIM-(teacher_calls) sprite."""
    student = copy.deepcopy(teacher).train()
    dtype = fast_settings("cpu")[0]
    teacher.autocast_dtype = student.autocast_dtype = dtype
    gen = torch.Generator().manual_seed(seed)
    batches = blended_contexts(du.sprite_batches(images, labels, batch_size=batch_size, generator=gen),
                               blend_prob=0.2, generator=gen)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    ema = du.EMA(student, decay=0.995)
    ab = schedule.ab_t[schedule.T]
    t0, updates = time.time(), 0
    while time.time() - t0 < seconds:
        _, c = next(batches)
        c = c * (torch.rand(len(c), generator=gen) >= 0.1).float()[:, None]
        x_T = torch.randn(len(c), 3, 16, 16, generator=gen)
        with torch.no_grad():
            target, _ = du.sample_ddim(teacher, len(c), schedule, n_steps=teacher_calls, context=c, guide_w=GUIDE_W,
                                       x_T=x_T)
        v_target = du.convert_prediction(target, x_T, ab.sqrt(), (1 - ab).sqrt(), source="x0", target="v")
        loss = F.mse_loss(student(x_T, torch.ones(len(c)), c).float(), v_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(student)
        updates += 1
    final = ema.model.eval()
    final.autocast_dtype = teacher.autocast_dtype = None
    final.distilled = {"steps": 1, "guide_w": GUIDE_W, "teacher": "sprites"}
    return final, updates, time.time() - t0


def compare(args, classifier, images, labels, *, updates=300):
    real_ref, _, gen_labels = real_sets(classifier, images, labels, args.n, args.seed)
    teacher = du.load_pretrained("sprites", "cpu")
    schedule = du.model_schedule(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        config = DistillConfig(teacher_steps=4, updates=(updates,))
        minutes = run_distillation(config, tmp, progress=False)
        pd_student = du.load_model(student_file(tmp, 1), "cpu")
    seconds = 60 * sum(minutes.values())
    direct, n_direct, direct_seconds = direct_distillation(du.load_pretrained("sprites", "cpu"), schedule, images,
                                                           labels, seconds=seconds)
    rows = []
    for name, model, info in [("progressive, DDIM-4 -> 2 -> 1", pd_student, {"updates": [updates, updates]}),
                              ("direct, x_T -> DDIM-4 sprite", direct, {"updates": n_direct})]:
        rows.append({"method": name, "cpu_minutes": round((seconds if "progressive" in name else direct_seconds) / 60, 2),
                     **info, **score(model, schedule, 1, 0.0, classifier, real_ref, gen_labels, args.seed + 1)})
        print(json.dumps(rows[-1]), flush=True)
    return {"command": "python -m research.distill_ship --compare", "n": args.n, "rows": rows}


def record(path):
    res = json.loads(open(path).read())
    for row in (r for r in res["rows"] if r["model"] == "student"):
        name = f"sprites_student{row['calls']}"
        teacher_25 = next(r for r in res["rows"] if r["model"] == "teacher" and r["calls"] == 25)
        metrics = {"n": res["n"], "sampler": f"ddim{row['calls']}", "fid": row["fid"], "kid": row["kid"],
                   "guided_accuracy": row["accuracy"], "at_guide_w": res["guide_w"],
                   "teacher_fid_ddim25": teacher_25["fid"], "tables": "../research/distill_ship.json"}
        record_metrics_in(name, metrics)
    print("recorded the students' metrics in weights/manifest.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--compare", action="store_true", help="run the method comparison and add it to --out")
    ap.add_argument("--record", action="store_true", help="write the students' numbers into weights/manifest.json")
    args = ap.parse_args(argv)
    if args.record:
        return record(args.out)
    torch.set_num_threads(2)
    images, labels, _ = du.load_sprites()
    classifier = load_classifier("cpu")
    command = "python -m research.distill_ship " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.compare:
        out = json.loads(open(args.out).read()) if Path(args.out).exists() else {}
        out["comparison"] = compare(args, classifier, images, labels)
    else:
        old = json.loads(open(args.out).read()) if Path(args.out).exists() else {}
        out = {"command": command, "hardware": describe_device("cpu"), **judge(args, classifier, images, labels)}
        if "comparison" in old:
            out["comparison"] = old["comparison"]
    with open(args.out, "w") as f:
        f.write(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
