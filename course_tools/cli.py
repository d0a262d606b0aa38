"""The command line: `python diffusion_utilities.py train|sample|export|train-classifier|evaluate|make-dataset --help`.

`train` also runs data-parallel under torchrun (see course_tools.runs.distributed).

Nothing here writes under weights/ unless told to with --to-weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from course_tools.hardware import describe_device, fast_settings
from course_tools.manifest import add_to_manifest, read_manifest, record_metrics_in, remove_from_manifest
from course_tools.metrics import (
    classifier_outputs,
    compare_solvers,
    evaluate,
    load_classifier,
    memorisation_figure,
    metrics_markdown,
    solvers_markdown,
    split_indices,
    train_classifier,
)
from course_tools.pictures import save_gif, save_grid_png
from course_tools.runs import save_atomic, write_atomic
from course_tools.training import TrainConfig, run_training
from diffusion_utilities import (
    DATA_FILE,
    WEIGHTS_DIR,
    ContextUnet,
    get_device,
    load_model,
    load_pretrained,
    load_sprites,
    model_schedule,
    plot_sample,
    read_weights,
    sample_ddim,
    sample_ddpm,
    sample_flow,
    to_tensor_images,
)


def _cmd_train(args):
    flow = args.objective == "flow"  # flow matching (notebook 8): velocity target, logit-normal s by default
    config = TrainConfig(steps=args.steps, objective=args.objective, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed,
                         warmup=args.warmup, drop_prob=args.drop_prob, ema_decay=args.ema_decay,
                         ema_warmup=args.ema_warmup, n_feat=args.n_feat, norm=args.norm,
                         prediction="u" if flow else args.prediction, zero_init=args.zero_init,
                         snr_gamma=None if flow else (args.snr_gamma or None),
                         t_sampling=args.t_sampling or ("logit-normal" if flow else "uniform"),
                         input_perturbation=args.input_perturbation,
                         class_balance=args.class_balance,
                         snapshot_steps=sorted(args.snapshots), checkpoint_every=args.checkpoint_every,
                         terminal_signal=args.terminal_signal)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    history = run_training(config, args.out, data_path=args.data, resume=args.resume, minutes=args.minutes,
                    device=args.device)
    print(f"{len(history)} of {config.steps} steps done; last-200 mean loss "
          f"{np.mean(history[-200:]):.4f}; this run took {(time.time() - t0) / 60:.1f} min; files in {args.out}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def _cmd_sample(args):
    # every check before any compute
    if Path(args.out).suffix.lower() not in IMAGE_SUFFIXES:
        raise SystemExit(f"sample: --out {args.out} must end in an image format: {', '.join(IMAGE_SUFFIXES)}")
    if args.gif and Path(args.gif).suffix.lower() != ".gif":
        raise SystemExit(f"sample: --gif {args.gif} must end in .gif")
    for path in filter(None, (args.out, args.gif)):
        _destination(Path(path).parent, args.to_weights, "sample")
    if args.sampler == "ddpm" and args.steps is not None:
        raise SystemExit("sample: --steps sets DDIM's step count; DDPM always takes all 500 steps "
                         "(drop --steps, or use --sampler ddim)")
    device = get_device(args.device)
    model = load_model(args.weights, device) if args.weights else load_pretrained(args.model, device)
    names = _class_names(model)
    classes = [_class_id(c, names) for c in (args.classes or names)]
    schedule = model_schedule(model)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    gen = torch.Generator().manual_seed(args.seed)
    student = getattr(model, "distilled", None)  # notebook 9: its own number of calls, guidance already learned
    args.steps = args.steps or (student["steps"] if student else None)
    args.guide_w = (0.0 if student else 2.0) if args.guide_w is None else args.guide_w
    common = dict(context=labels, guide_w=args.guide_w, generator=gen, progress=True,
                  guide_interval=args.guide_interval and tuple(args.guide_interval), guide_rescale=args.guide_rescale)
    if model.prediction == "u":  # a flow model (notebook 8): Euler's method, guidance as usual
        if args.sampler == "ddpm" or args.eta or args.guide_interval or args.guide_rescale:
            raise SystemExit("sample: a flow model is sampled with Euler's method, --steps calls; it takes no "
                             "--sampler ddpm, --eta, --guide-interval or --guide-rescale")
        x, frames, _ = sample_flow(model, len(labels), n_steps=args.steps or 25, context=labels, guide_w=args.guide_w,
                                   generator=gen, progress=True)
    elif args.sampler == "ddpm":
        x, frames = sample_ddpm(model, len(labels), schedule, **common)
    else:
        x, frames = sample_ddim(model, len(labels), schedule, n_steps=args.steps or 25, eta=args.eta, **common)
    save_grid_png(x, args.out, nrow=args.per_class)
    print(f"wrote {args.out}")
    if args.gif:
        save_gif(plot_sample(frames, nrow=args.per_class), args.gif)
        print(f"wrote {args.gif}")


def _class_id(name, names):
    if name.isdigit() and int(name) < len(names):
        return int(name)
    if name not in names:
        raise SystemExit(f"unknown class {name!r}; choose from {', '.join(names)} (or 0..{len(names) - 1})")
    return names.index(name)


def _class_names(model):
    """The model's class names: as its weights file records them (load_model reads them); otherwise the
    course data file's names when the counts agree, else the ids "0", "1", ..."""
    if getattr(model, "class_names", None):
        return list(model.class_names)
    names = load_sprites(DATA_FILE)[2]
    return names if model.n_cfeat == len(names) else [str(i) for i in range(model.n_cfeat)]


def _destination(path, to_weights, command):
    """Where a command writes: path, or weights/ with --to-weights; a path inside weights/ needs the flag."""
    if to_weights:
        return WEIGHTS_DIR
    path = Path(path).resolve()
    if path == WEIGHTS_DIR or WEIGHTS_DIR in path.parents:
        raise SystemExit(f"{command}: {path} is inside the shipped weights/; pass --to-weights to replace "
                         "what ships, or choose another folder")
    return path


def _cmd_distill(args):
    from course_tools.distill import DistillConfig, export_students, run_distillation

    if args.export:  # the run's own settings come from its run.json, not from these flags
        wdir = _destination(args.weights_dir, args.to_weights, "distill --export")
        wdir.mkdir(parents=True, exist_ok=True)
        command = args.made_by or "python diffusion_utilities.py distill " + " ".join(args.argv)
        return export_students(args.out, wdir, command=command, ship=args.ship)
    config = DistillConfig(teacher=args.teacher, teacher_steps=args.teacher_steps, updates=tuple(args.updates),
                           batch_size=args.batch_size, lr=args.lr, guide_w=args.guide_w, seed=args.seed,
                           checkpoint_every=args.checkpoint_every)
    _destination(args.out, False, "distill")  # a run folder never lives inside weights/
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = run_distillation(config, args.out, data_path=args.data, resume=args.resume)
    print("students (calls: minutes): " + ", ".join(f"{n}: {m:.1f}" for n, m in minutes.items())
          + f"; files in {args.out}")


def _cmd_make_dataset(args):
    from course_tools.dataset import make_dataset, summary, write_dataset

    out = Path(args.out)
    if out.suffix != ".npz":
        raise SystemExit(f"make-dataset: --out {out} must end in .npz")
    if out.resolve() == Path(DATA_FILE).resolve():
        raise SystemExit(f"make-dataset: {out} is the course's sprite set; choose another name, e.g. data/mine.npz")
    data, report = make_dataset(args.folder, size=args.size, fit=args.fit)
    write_dataset(data, out)
    sheet = out.with_name(out.stem + "_sheet.png")
    labels = data["labels"]
    first = np.concatenate([np.flatnonzero(labels == c)[:8] for c in range(len(data["class_names"]))])
    save_grid_png(to_tensor_images(data["images"][first]), sheet, nrow=8, scale=max(1, 64 // data["images"].shape[1]))
    print(summary(data, report))
    print(f"wrote {out} and a contact sheet (up to 8 per class, one class after another) {sheet}")
    print(f"train on it: python diffusion_utilities.py train --data {out} --out runs/{out.stem}")


def _cmd_export(args):
    """Copy a finished run's EMA weights and snapshots into weights/ and record them in the manifest."""
    run, wdir = Path(args.run), _destination(args.weights_dir, args.to_weights, "export")
    hist = json.loads((run / "history.json").read_text())
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = ck["config"]
    if ck["step"] < cfg["steps"]:
        raise SystemExit(f"export: {run} stopped at step {ck['step']} of {cfg['steps']}; finish it first with "
                         f"`python diffusion_utilities.py train --out {run} --resume` (and the same settings)")
    have = run_snapshots(run)
    missing = sorted(set(args.snapshots or []) - set(have))
    if missing:
        raise SystemExit(f"export: {run} has no snapshot at step(s) {missing} to ship (it has {sorted(have) or 'none'})")
    snaps = {step: have[step] for step in (have if args.snapshots is None else sorted(set(args.snapshots)))}
    weights, model_args, _ = read_weights(run / "checkpoint.pt")
    if args.average_snapshots:
        params = {name for name, _ in ContextUnet(**model_args).named_parameters()}
        weights = average_with_snapshots(weights, run, args.average_snapshots, keys=params)
    made = {"command": args.made_by or f"python diffusion_utilities.py train --steps {cfg['steps']} --seed {cfg['seed']}",
            "seed": cfg["seed"], "config": cfg, "hardware": hist.get("device", "unknown"), "args": model_args}
    if ck.get("class_names"):
        made["class_names"] = list(ck["class_names"])
    if ck.get("schedule"):
        made["schedule"] = ck["schedule"]
    wdir.mkdir(parents=True, exist_ok=True)
    loss = np.asarray(hist["loss"])
    k = 50  # the loss curve the training lesson plots: means over blocks of 50 steps
    curve = [round(float(v), 5) for v in loss[: len(loss) // k * k].reshape(-1, k).mean(1)]
    write_atomic(wdir / f"{args.name}_loss.json", json.dumps({"block": k, "mean_loss": curve}))
    # self-describing like ema.pt and the snapshots, so that load_model(file) rebuilds the right network and schedule
    extras = {k: ck[k] for k in ("schedule", "class_names") if ck.get(k)}
    save_atomic({"model_args": model_args, "state_dict": weights, "step": ck["step"], **extras}, wdir / f"{args.name}.pt")
    minutes = args.train_minutes
    if minutes is None and "train_seconds" in ck:
        minutes = round(ck["train_seconds"] / 60, 1)
    averaged = {"averaged_with_snapshots": sorted(args.average_snapshots)} if args.average_snapshots else {}
    add_to_manifest(args.name, f"{args.name}.pt", weights_dir=wdir, step=ck["step"],
                    train_minutes=minutes, **averaged, **made)
    fresh = {f"{args.name}_step{step:06d}" for step in snaps}
    if (wdir / "manifest.json").exists():  # snapshots of an earlier export that this export does not ship
        for old in [n for n in read_manifest(wdir) if n.startswith(f"{args.name}_step") and n not in fresh]:
            remove_from_manifest(old, wdir)
    kept = 0
    for step, snap in snaps.items():
        name = f"{args.name}_step{step:06d}"
        data = torch.load(snap, map_location="cpu", weights_only=True)
        if _same_weights(wdir / f"{name}.pt", data["state_dict"]):
            kept += 1  # a rerun of the same training: leave the file's bytes, and its sha256, as they are
        else:
            save_atomic(data, wdir / f"{name}.pt")
        add_to_manifest(name, f"{name}.pt", weights_dir=wdir, step=step,
                        note="EMA snapshot during the same run (fp16)", **made)
    print(f"exported {args.name} (step {ck['step']}) and {len(snaps)} snapshots to {wdir}"
          + (f" ({kept} already there with the same weights, left as they were)" if kept else ""))


def _same_weights(path, state):
    """True when path is a weights file whose weights equal state's, tensor for tensor (fp16 snapshots are
    compared after read_weights' cast to fp32, which is exact); False when it is missing or unreadable."""
    try:
        old = read_weights(path)[0]
    except (FileNotFoundError, ValueError):
        return False
    return old.keys() == state.keys() and all(torch.equal(old[k], v.float() if v.is_floating_point() else v)
                                              for k, v in state.items())


def run_snapshots(run):
    """{step: path} of a run folder's EMA snapshots (snap_<step>.pt, as course_tools.runs writes them)."""
    return {int(p.stem.removeprefix("snap_")): p for p in sorted(Path(run).glob("snap_*.pt"))}


def average_with_snapshots(final, run, steps, *, keys):
    """The mean of the final EMA weights and the EMA snapshots saved at these steps: an average over more of
    the end of training than the EMA alone (post-hoc averaging of stored snapshots, as in Karras et al. 2024,
    "Analyzing and Improving the Training Dynamics of Diffusion Models"). Only the entries named in keys are
    averaged, the rest stay the final ones: export averages the parameters and keeps BatchNorm's running
    statistics (averaging them too was measured worse, research/ema_length.json)."""
    paths = run_snapshots(run)
    missing = sorted(set(steps) - set(paths))
    if missing:
        raise SystemExit(f"export: {run} has no snapshot at step(s) {missing} (it has {sorted(paths) or 'none'}); "
                         "save them with `train --snapshots STEP ...`")
    snaps = [read_weights(paths[step])[0] for step in sorted(set(steps))]
    return {k: (sum([v, *(s[k] for s in snaps)]) / (1 + len(snaps)) if k in keys else v) for k, v in final.items()}


def _cmd_train_classifier(args):
    images, labels, class_names = load_sprites(args.data)
    train_idx, test_idx = split_indices(labels, seed=args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    clf = train_classifier(images[train_idx], labels[train_idx], n_classes=len(class_names), epochs=args.epochs,
                           seed=args.seed)
    _, pred = classifier_outputs(clf, to_tensor_images(images[test_idx]))
    acc = float((pred == labels[test_idx]).mean())
    out = WEIGHTS_DIR / "classifier.pt" if args.to_weights else Path(args.out)
    save_atomic(clf.state_dict(), out)
    if args.to_weights:
        add_to_manifest("classifier", "classifier.pt", "classifier", args={"n_classes": len(class_names)}, seed=args.seed,
                        command="python diffusion_utilities.py " + " ".join(args.argv),
                        train_minutes=round((time.time() - t0) / 60, 1), hardware=describe_device("cpu"),
                        metrics={"held_out_accuracy": round(acc, 3), "held_out_n": len(test_idx),
                                 "split": f"split_indices(labels, 0.15, seed={args.seed})"})
    print(f"wrote {out}: held-out accuracy {acc:.1%} on {len(test_idx)} sprites, "
          f"{time.time() - t0:.0f} s")


def _cmd_evaluate(args):
    out = _destination(args.out, args.to_weights, "evaluate")
    if args.to_weights and args.weights:
        raise SystemExit("evaluate: --to-weights records a shipped model's numbers; use --model NAME, not --weights")
    device = get_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.weights, device) if args.weights else load_pretrained(args.model, device)
    interval, T = args.guide_interval and tuple(args.guide_interval), model_schedule(model).T
    if interval and not 0 <= interval[0] <= interval[1] <= T:
        raise SystemExit(f"evaluate: --guide-interval LOW HIGH needs 0 <= LOW <= HIGH <= {T}, got {list(interval)}")
    if args.guide_rescale is not None and not 0 < args.guide_rescale <= 1:
        raise SystemExit(f"evaluate: --guide-rescale needs a number in (0, 1], got {args.guide_rescale}")
    classifier = load_classifier(device)
    images, labels, class_names = load_sprites(args.data)
    _, test_idx = split_indices(labels, seed=0)
    amp_dtype = fast_settings(device)[0] if args.fast else None
    command = "python diffusion_utilities.py " + " ".join(args.argv)
    solvers = None
    if args.solver_calls:
        solvers = compare_solvers(model, classifier, model_schedule(model), images, labels, n=args.n, seed=args.seed,
                                  calls=tuple(args.solver_calls), amp_dtype=amp_dtype)
        solvers["command"] = command
    if args.only_solvers:
        _update_solvers(out, solvers)
        return
    snapshots = {name: load_pretrained(name, device) for name in args.snapshots}
    res, samples, nn_idx, dist = evaluate(model, classifier, model_schedule(model), images, labels, test_idx,
                                          class_names=class_names, n=args.n, seed=args.seed, amp_dtype=amp_dtype,
                                          ddim_steps=tuple(args.ddim_steps), guide_ws=tuple(args.guide_ws),
                                          per_class=args.per_class, snapshots=snapshots, guide_interval=interval,
                                          guide_rescale=args.guide_rescale)
    res["hardware"] = describe_device(device)
    res["command"] = command
    res["solvers"] = solvers
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.json", json.dumps(res, indent=2))
    write_atomic(out / "metrics.md", metrics_markdown(res, command.strip()))
    memorisation_figure(samples, dist, nn_idx, images, out / "memorisation.png")
    if args.to_weights:
        record_metrics(res, args.model)
    print((out / "metrics.md").read_text())


def _update_solvers(out, solvers):
    """evaluate --only-solvers: replace the solver table of an earlier evaluation in out, keep the rest."""
    path = out / "metrics.json"
    if not path.exists():
        raise SystemExit(f"evaluate --only-solvers: {path} does not exist; run the full evaluate first")
    if solvers is None:
        raise SystemExit("evaluate --only-solvers: --solver-calls is empty, so there is nothing to measure")
    res = json.loads(path.read_text())
    res["solvers"] = solvers
    markdown = metrics_markdown(res, res["command"])
    write_atomic(out / "metrics.md", markdown)
    write_atomic(path, json.dumps(res, indent=2))
    print("\n".join(solvers_markdown(solvers)))


def record_metrics(res, model_name, weights_dir=WEIGHTS_DIR):
    """Write the headline numbers of an evaluation beside each evaluated file in the manifest."""
    ddpm = res["samplers"][0]
    headline = {"n": res["n"], "fid_floor": res["floor"]["fid"], "fid_ddpm500": ddpm["fid"], "kid_ddpm500": ddpm["kid"],
                "tables": "metrics.md"}
    ddim = next((r for r in res["samplers"] if r["sampler"] == "ddim" and r["steps"] == res["guide_steps"]
                 and r["eta"] == 0), None)
    if ddim is not None:
        headline.update(fid_ddim25=ddim["fid"], kid_ddim25=ddim["kid"], accuracy_ddim25=ddim["accuracy"])
    if res["guidance"]:
        plain = [g for g in res["guidance"] if not g.get("guide_interval") and not g.get("guide_rescale")]
        best = max(plain, key=lambda g: g["balanced_accuracy"])
        headline.update(guided_accuracy=best["balanced_accuracy"], at_guide_w=best["guide_w"])
    metrics = {model_name: headline}
    metrics.update({k: {"n": res["n"], "fid_ddim25": v["fid"], "kid_ddim25": v["kid"], "accuracy_ddim25": v["accuracy"]}
                    for k, v in res["snapshots"].items()})
    for name, m in metrics.items():
        record_metrics_in(name, m, weights_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python diffusion_utilities.py",
                                 description="Train, sample from and evaluate the course's sprite diffusion model.")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a ContextUnet on the sprites (resumable)",
                        description="Train a conditional ContextUnet (context dropout, EMA, warm-up + cosine "
                                    "learning rate) on data/sprites16.npz. The defaults are the recipe study's "
                                    "half-hour recipe (v-prediction, Min-SNR-5, n_feat 64, batch 128, 3,300 steps). "
                                    "Writes checkpoint.pt, history.json, ema.pt and snapshots to --out.")
    tr.add_argument("--out", default="runs/sprites", help="output folder (default runs/sprites)")
    tr.add_argument("--steps", type=int, default=3300, help="total optimiser steps; sets the LR schedule")
    tr.add_argument("--minutes", type=float, default=None, help="stop after this many minutes (resume later)")
    tr.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--drop-prob", type=float, default=0.1, help="probability of training on the zero context")
    tr.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    tr.add_argument("--ema-decay", type=float, default=0.999)
    tr.add_argument("--ema-warmup", type=int, default=10, help="EMA decay ramps as (1 + n) / (this + n)")
    tr.add_argument("--n-feat", type=int, default=64)
    tr.add_argument("--norm", choices=["batch", "group"], default="batch")
    tr.add_argument("--prediction", choices=["eps", "v"], default="v", help="what the network predicts")
    tr.add_argument("--zero-init", action="store_true", help="start the output conv at zero")
    tr.add_argument("--snr-gamma", type=float, default=5.0,
                    help="Min-SNR-gamma loss weighting; 0 turns it off (plain MSE)")
    tr.add_argument("--objective", choices=["diffusion", "flow"], default="diffusion",
                    help="diffusion (notebook 3) or flow matching (notebook 8: predicts the velocity eps - x0)")
    tr.add_argument("--t-sampling", choices=["uniform", "lognormal", "logit-normal"], default=None,
                    help="how training draws t: uniform (diffusion's default) or lognormal; for --objective flow, "
                         "uniform or logit-normal (its default)")
    tr.add_argument("--input-perturbation", type=float, default=0.0)
    tr.add_argument("--terminal-signal", type=float, default=None,
                    help="rescale the schedule so that sqrt(ab_T) is this (e.g. 0.004; the course's leaves 0.079)")
    tr.add_argument("--class-balance", type=float, default=0.5,
                    help="draw class c with probability ~ n_c**this (1 = as in the data, 0 = balanced)")
    tr.add_argument("--snapshots", type=int, nargs="*", default=[], help="steps at which to save EMA snapshots")
    tr.add_argument("--checkpoint-every", type=int, default=500)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    tr.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    tr.add_argument("--data", default=str(DATA_FILE))
    tr.set_defaults(func=_cmd_train)

    sa = sub.add_parser("sample", help="write a PNG grid (and optionally a GIF) of samples",
                        description="Sample sprites for chosen classes; one row per class.")
    sa.add_argument("--out", default="outputs/samples.png")
    sa.add_argument("--gif", default=None, help="also write the denoising animation here")
    sa.add_argument("--classes", nargs="+", default=None,
                    help="class names or ids, one row each (default: every class the model knows)")
    sa.add_argument("--per-class", type=int, default=8)
    sa.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    sa.add_argument("--steps", type=int, default=None, help="DDIM steps (1..500, default 25), or a flow model's "
                    "Euler steps")
    sa.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    sa.add_argument("--guide-w", type=float, default=None,
                    help="classifier-free guidance weight (default 2; a distilled student: 0, it learned its guidance)")
    sa.add_argument("--guide-interval", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help="guide only at steps LOW <= t <= HIGH (default: every step)")
    sa.add_argument("--guide-rescale", type=float, default=0.0, metavar="PHI",
                    help="guidance rescale phi, 0..1 (0: plain guidance; evaluate scores 0.85, see weights/metrics.md)")
    sa.add_argument("--model", default="sprites", help="name in weights/manifest.json")
    sa.add_argument("--weights", default=None, help="a weights or checkpoint file instead of --model")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--to-weights", action="store_true", help="allow --out/--gif inside weights/ (README pictures)")
    sa.add_argument("--device", default=None)
    sa.set_defaults(func=_cmd_sample)

    ex = sub.add_parser("export", help="copy a finished run's EMA weights and snapshots beside a manifest",
                        description="Copy --run's EMA weights (fp32) and snapshots (fp16) into --weights-dir, with "
                                    "sha256, config, hardware and training time in its manifest.json. Only "
                                    "--to-weights touches the shipped weights/.")
    ex.add_argument("--run", default="runs/sprites")
    ex.add_argument("--name", default="sprites")
    ex.add_argument("--command", dest="made_by", default=None,
                    help="the commands that made the weights, to record in the manifest")
    ex.add_argument("--weights-dir", default="outputs/export",
                    help="where to write the files and their manifest (default outputs/export)")
    ex.add_argument("--to-weights", action="store_true",
                    help="write into the course's weights/ instead, replacing what ships")
    ex.add_argument("--train-minutes", type=float, default=None, help="wall-clock training time to record "
                    "(default: as measured in the checkpoint)")
    ex.add_argument("--snapshots", type=int, nargs="*", default=None, metavar="STEP",
                    help="which of the run's EMA snapshots to ship (default: all of them)")
    ex.add_argument("--average-snapshots", type=int, nargs="+", default=[], metavar="STEP",
                    help="ship the mean of the final EMA weights and the run's EMA snapshots at these steps "
                         "(a longer average; the shipped model uses 4000 4400 4800 5200)")
    ex.set_defaults(func=_cmd_export)

    di = sub.add_parser("distill", help="distil a shipped model into few-call students (notebook 9; resumable)",
                        description="Progressive distillation (Salimans & Ho 2022): the teacher's guided DDIM with "
                                    "--teacher-steps calls teaches a student of half as many, which teaches the "
                                    "next, down to one call. Writes checkpoint.pt and studentN.pt to --out; "
                                    "--export copies the students into --weights-dir (weights/ only with --to-weights).")
    di.add_argument("--out", default="runs/distill", help="output folder (default runs/distill)")
    di.add_argument("--teacher", default="sprites", help="a v-predicting model in weights/manifest.json")
    di.add_argument("--teacher-steps", type=int, default=16, help="the teacher's DDIM calls, a power of two")
    di.add_argument("--updates", type=int, nargs="+", default=[1400],
                    help="optimiser steps per round: one number, or one per round (students of "
                         "teacher-steps/2, /4, ..., 1 calls)")
    di.add_argument("--batch-size", type=int, default=64)
    di.add_argument("--lr", type=float, default=2e-4)
    di.add_argument("--guide-w", type=float, default=2.0, help="the teacher's guidance, baked into the students")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--checkpoint-every", type=int, default=100, help="updates between checkpoints")
    di.add_argument("--resume", action="store_true", help="continue the run in --out")
    di.add_argument("--export", action="store_true",
                    help="copy the finished run's students instead of training (with the run's own settings)")
    di.add_argument("--ship", type=int, nargs="+", default=[4, 2, 1], help="which students --export copies")
    di.add_argument("--command", dest="made_by", default=None,
                    help="the command that made the run, to record in the manifest")
    di.add_argument("--weights-dir", default="outputs/export", help="where --export writes (default outputs/export)")
    di.add_argument("--to-weights", action="store_true", help="let --export write into the course's weights/")
    di.add_argument("--threads", type=int, default=None)
    di.add_argument("--data", default=str(DATA_FILE))
    di.set_defaults(func=_cmd_distill)

    tc = sub.add_parser("train-classifier", help="train the SpriteClassifier the metrics use",
                        description="Train the small sprite classifier on a stratified 85%% split.")
    tc.add_argument("--out", default="runs/classifier.pt")
    tc.add_argument("--to-weights", action="store_true",
                    help="replace the shipped weights/classifier.pt and its manifest entry")
    tc.add_argument("--epochs", type=int, default=30)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--data", default=str(DATA_FILE))
    tc.set_defaults(func=_cmd_train_classifier)

    md = sub.add_parser("make-dataset", help="turn a folder of images (one subfolder per class) into a dataset",
                        description="Read DIR/<class>/<image> (PNG, JPEG, WebP), composite over white, pad or crop "
                                    "to a square, resize (crisp for pixel art), drop exact duplicates and write an "
                                    ".npz like data/sprites16.npz, with a contact sheet beside it.")
    md.add_argument("folder", help="a folder with one subfolder of images per class")
    md.add_argument("--size", type=int, default=16, help="image size in pixels, a multiple of 4 (default 16)")
    md.add_argument("--out", default="data/mine.npz")
    md.add_argument("--fit", choices=["pad", "crop"], default="pad",
                    help="make non-square images square by padding (default) or cropping the centre")
    md.set_defaults(func=_cmd_make_dataset)

    ev = sub.add_parser("evaluate", help="write the quality tables (sprite-FID, KID, accuracy, memorisation)",
                        description="Measure a sprite model: sprite-FID and KID against the real-vs-real floor, "
                                    "a sampler table, class accuracy under guidance, and memorisation. Writes "
                                    "metrics.json, metrics.md and memorisation.png to --out.")
    ev.add_argument("--out", default="outputs/evaluation", help="folder for the tables (default outputs/evaluation)")
    ev.add_argument("--to-weights", action="store_true",
                    help="write the tables into weights/ and the headline numbers into its manifest")
    ev.add_argument("--n", type=int, default=1000, help="samples per FID/KID (and real sprites per side)")
    ev.add_argument("--per-class", type=int, default=100, help="samples per class for guided accuracy")
    ev.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 25, 50, 100])
    ev.add_argument("--guide-ws", type=float, nargs="+", default=[0, 1, 2, 4])
    ev.add_argument("--guide-interval", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help="also score each w > 0 with guidance only at steps LOW <= t <= HIGH")
    ev.add_argument("--guide-rescale", type=float, default=None, metavar="PHI",
                    help="also score each w > 0 with guidance rescaled by PHI in (0, 1]")
    ev.add_argument("--model", default="sprites")
    ev.add_argument("--snapshots", nargs="*", default=[], help="more manifest names to score with DDIM-25 only")
    ev.add_argument("--weights", default=None, help="a weights or checkpoint file instead of --model")
    ev.add_argument("--solver-calls", type=int, nargs="*", default=[5, 10, 20, 50],
                    help="network calls at which to compare DDIM with DPM-Solver++ (none: skip)")
    ev.add_argument("--only-solvers", action="store_true",
                    help="measure only the solver comparison and put it into --out's existing metrics")
    ev.add_argument("--fast", action="store_true", help="bf16 autocast for the network where the CPU has it")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--device", default=None)
    ev.add_argument("--data", default=str(DATA_FILE))
    ev.set_defaults(func=_cmd_evaluate)

    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, FloatingPointError) as err:
        # one clear line for the learner, not a traceback from deep inside torch
        raise SystemExit(f"{args.command}: {err}") from None
