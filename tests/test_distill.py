"""Notebook 9: progressive distillation. The target against two teacher DDIM steps computed independently (float64,
closed forms, guidance included), the time grids, a tiny distillation that reduces the student's error, the shipped
students through the module's samplers, the `distill` command (resume, refusals, export) and clear errors."""
import json
import shutil

import numpy as np
import pytest
import torch

import course_tools.distill as cd
import diffusion_utilities as du
from course_tools import cli
from course_tools.manifest import add_to_manifest, read_manifest, sha256_file


def v_model(seed=0, n_feat=16):
    torch.manual_seed(seed)
    return du.ContextUnet(n_feat=n_feat, prediction="v").double().eval()


@torch.no_grad()
def two_ddim_steps_by_hand(model, x, steps, schedule, context, w):
    """Deterministic DDIM from the definitions: eps and x0 from v (alpha^2 + sigma^2 = 1), then
    x' = alpha' x0 + sigma' eps; guidance (1 + w) v(c) - w v(0)."""
    for a, b in zip(steps[:-1], steps[1:]):
        alpha, sigma = schedule.ab_t.double()[a].sqrt(), (1 - schedule.ab_t.double()[a]).sqrt()
        alpha_b, sigma_b = schedule.ab_t.double()[b].sqrt(), (1 - schedule.ab_t.double()[b]).sqrt()
        tt = torch.full((len(x),), a / schedule.T, dtype=torch.float64)
        v = (1 + w) * model(x, tt, context) - w * model(x, tt, torch.zeros_like(context))
        eps, x0 = alpha * v + sigma * x, alpha * x - sigma * v
        x = alpha_b * x0 + sigma_b * eps
    return x


@pytest.mark.parametrize("steps", [(500, 438, 375), (375, 312, 250), (125, 62, 0), (40, 39, 38)])
@pytest.mark.parametrize("w", [0.0, 2.0])
def test_target_makes_one_step_land_on_two_teacher_steps(steps, w):
    schedule = du.make_schedule(500, terminal_signal=0.004)
    model = v_model()
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    context = du.one_hot(torch.tensor([0, 1, 2, 4])).double()
    t, t_mid, t_next = steps
    x_tilde = du.distillation_target(model, x_t, t, t_mid, t_next, schedule, context=context, guide_w=w)
    z_next = two_ddim_steps_by_hand(model, x_t, steps, schedule, context, w)
    # one DDIM step t -> t_next with clean image x_tilde, from the step's definition
    ab, ab_next = schedule.ab_t.double()[t], schedule.ab_t.double()[t_next]
    eps_tilde = (x_t - ab.sqrt() * x_tilde) / (1 - ab).sqrt()
    one_step = ab_next.sqrt() * x_tilde + (1 - ab_next).sqrt() * eps_tilde
    # (the samplers hand the network's output on as fp32: rounding of 1e-7, not 1e-15)
    assert float((one_step - z_next).detach().abs().max()) < 1e-6
    if t_next == 0:  # landing on the image itself: the target is the teacher's result
        assert float((x_tilde - z_next).detach().abs().max()) < 1e-6


def test_target_with_one_step_per_image_equals_the_int_version():
    schedule = du.make_schedule(500, terminal_signal=0.004)
    model = v_model()
    x_t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    context = du.one_hot(torch.tensor([0, 3, 4])).double()
    t, t_mid, t_next = du.distillation_times(4, 500)
    batched = du.distillation_target(model, x_t, t[:3], t_mid[:3], t_next[:3], schedule, context=context, guide_w=2.0)
    for i in range(3):
        alone = du.distillation_target(model, x_t[i:i + 1], int(t[i]), int(t_mid[i]), int(t_next[i]), schedule,
                                       context=context[i:i + 1], guide_w=2.0)
        assert torch.allclose(batched[i:i + 1], alone, atol=1e-6)


def test_target_differs_from_the_teachers_one_step_estimate():
    """The second teacher call moves the target: it is not the teacher's own x0 estimate at x_t."""
    schedule = du.make_schedule(500, terminal_signal=0.004)
    model = v_model()
    x_t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_tilde = du.distillation_target(model, x_t, 375, 312, 250, schedule)
    with torch.no_grad():
        one = du.predict_x0(x_t, 375, du.predict_noise(model, x_t, 375, schedule), schedule)
    assert float((x_tilde - one).abs().mean()) > 1e-3


def test_distillation_times_halve_ddims_grid():
    t, t_mid, t_next = du.distillation_times(4, 500)
    assert t.tolist() == [500, 375, 250, 125] and t_mid.tolist() == [438, 312, 188, 62]
    assert t_next.tolist() == [375, 250, 125, 0]
    for n in (1, 2, 8, 16):  # the student's grid is DDIM's own grid for n calls, the teacher's for 2n
        t, t_mid, t_next = du.distillation_times(n, 500)
        assert t.tolist() + [0] == du.ddim_timesteps(500, n) and t_next.tolist() == du.ddim_timesteps(500, n)[1:]
        assert sorted(t.tolist() + t_mid.tolist() + [0], reverse=True) == du.ddim_timesteps(500, 2 * n)
    for bad in (0, 3, 6, 512, 2.0, "4"):
        with pytest.raises(ValueError, match="power of two"):
            du.distillation_times(bad, 500)


def test_a_tiny_distillation_reduces_the_students_error():
    """A copy of a small teacher, 25 updates of du.train with distill_loss: its 1-call samples move towards the
    teacher's 2-call samples from the same noise (by at least a third)."""
    schedule = du.make_schedule(500, terminal_signal=0.004)
    torch.manual_seed(0)
    teacher = du.ContextUnet(n_feat=16, prediction="v").eval()
    student = du.ContextUnet(n_feat=16, prediction="v")
    student.load_state_dict(teacher.state_dict())
    classes = torch.arange(16) % 5
    x_T = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    goal, _ = du.sample_ddim(teacher, 16, schedule, n_steps=2, context=classes, x_T=x_T)

    def error():
        return float(((du.sample_ddim(student, 16, schedule, n_steps=1, context=classes, x_T=x_T)[0] - goal) ** 2)
                     .mean().sqrt())

    before = error()
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    c = du.one_hot(torch.arange(32) % 5)
    batches = iter(lambda: (x, c), None)
    du.train(student, batches, schedule, steps=25, lr=1e-3, warmup=2, lr_min=1e-3, progress=False,
             loss_fn=du.distill_loss, teacher=teacher, n_steps=1, generator=torch.Generator().manual_seed(6))
    assert error() < 0.67 * before  # measured: 0.45 -> 0.24


def test_distill_loss_refuses_what_cannot_be_distilled():
    schedule = du.make_schedule(500)
    eps_model, v = du.ContextUnet(n_feat=8), du.ContextUnet(n_feat=8, prediction="v")
    x, c = torch.zeros(2, 3, 16, 16), du.one_hot(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="v-predicting"):
        du.distill_loss(v, x, c, schedule, teacher=eps_model, n_steps=2)
    v.distilled = {"steps": 2, "guide_w": 2.0, "teacher": "sprites"}
    with pytest.raises(ValueError, match="already learned guided"):
        du.distill_loss(v, x, c, schedule, teacher=v, n_steps=1, guide_w=2.0)
    with pytest.raises(ValueError, match="t > t_mid > t_next"):
        du.distillation_target(v, x, 100, 200, 50, schedule)


@pytest.mark.parametrize("calls", [4, 2, 1])
def test_shipped_students_sample_through_the_module(calls):
    student = du.load_pretrained(f"sprites_student{calls}", "cpu")
    entry = read_manifest()[f"sprites_student{calls}"]
    assert student.distilled == {"steps": calls, "guide_w": 2.0, "teacher": "sprites"} == entry["distilled"]
    assert entry["teacher_sha256"] == read_manifest()["sprites"]["sha256"] and entry["train_minutes"] > 0
    schedule = du.model_schedule(student)
    x, frames = du.sample_ddim(student, 8, schedule, n_steps=calls, context=torch.arange(8) % 5,
                               generator=torch.Generator().manual_seed(0))
    assert frames.shape == (calls + 1, 8, 3, 16, 16) and bool(torch.isfinite(x).all())
    assert float(x.abs().max()) < 1.5 and float(x.std()) > 0.3   # sprites in about [-1, 1], not a flat blur
    for wrong in ({"n_steps": calls * 2}, {"n_steps": 25}):
        with pytest.raises(ValueError, match=f"distilled for {calls} DDIM call"):
            du.sample_ddim(student, 2, schedule, context=torch.tensor([0, 1]), **wrong)
    with pytest.raises(ValueError, match="guide_w=0"):
        du.sample_ddim(student, 2, schedule, n_steps=calls, context=torch.tensor([0, 1]), guide_w=2.0)
    with pytest.raises(ValueError, match="sample it with du.sample_ddim"):
        du.sample_dpm_solver(student, 2, schedule, n_steps=calls, context=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sample it with du.sample_ddim"):
        du.sample_ddpm(student, 2, schedule, context=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="got inpaint"):
        du.inpaint(student, x[:1].clamp(-1, 1), torch.ones(1, 1, 16, 16), schedule, n_steps=calls,
                   context=torch.tensor([0]))
    back = du.invert_ddim(student, x[:2].clamp(-1, 1), schedule, n_steps=calls, context=torch.tensor([0, 1]))  # its own jumps
    assert back.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=f"distilled for {calls} DDIM call"):
        du.invert_ddim(student, x[:2].clamp(-1, 1), schedule, n_steps=calls + 1, context=torch.tensor([0, 1]))


def test_distill_config_checks_its_settings():
    assert cd.DistillConfig(teacher_steps=16).rounds() == [8, 4, 2, 1]
    assert cd.DistillConfig(teacher_steps=8, updates=(3, 4, 5)).updates_in(2) == 5
    for bad, match in [({"teacher_steps": 6}, "power of two"), ({"teacher_steps": 1}, "power of two"),
                       ({"teacher_steps": 8, "updates": (3, 4)}, "one per round"), ({"updates": (0,)}, "one per round"),
                       ({"blend_prob": 1.5}, "blend_prob"), ({"guide_w": float("nan")}, "guide_w")]:
        with pytest.raises(ValueError, match=match):
            cd.DistillConfig(**bad)


def test_blended_contexts_sum_to_one():
    x, c = torch.zeros(400, 3, 16, 16), du.one_hot(torch.arange(400) % 5)
    out = next(cd.blended_contexts(iter([(x, c)]), blend_prob=0.5, generator=torch.Generator().manual_seed(0)))[1]
    blended = (out.max(1).values < 1)
    assert 0.4 < float(blended.float().mean()) < 0.6 and torch.allclose(out.sum(1), torch.ones(400))
    assert bool((out >= 0).all())


def test_teacher_failing_its_checksum_is_refused(tmp_path):
    shutil.copy(du.WEIGHTS_DIR / "sprites.pt", tmp_path / "sprites.pt")
    add_to_manifest("sprites", "sprites.pt", weights_dir=tmp_path, args=read_manifest()["sprites"]["args"])
    with open(tmp_path / "sprites.pt", "r+b") as f:  # one flipped byte in the middle of the weights
        f.seek(3_000_000)
        byte = f.read(1)
        f.seek(3_000_000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match="does not match its manifest"):
        cd.load_teacher(cd.DistillConfig(), weights_dir=tmp_path)
    with pytest.raises(ValueError, match="does not match its manifest"):
        cd.run_distillation(cd.DistillConfig(teacher_steps=2, updates=(1,)), tmp_path / "run", weights_dir=tmp_path)


def test_a_flow_teacher_is_refused():
    with pytest.raises(ValueError, match="v-predicting"):
        cd.load_teacher(cd.DistillConfig(teacher="sprites_flow"))


@pytest.mark.slow
def test_distill_command_resumes_exactly_refuses_and_exports(tiny_npz, tmp_path, monkeypatch):
    args = ["--teacher-steps", "2", "--updates", "6", "--batch-size", "4", "--checkpoint-every", "3", "--data",
            str(tiny_npz)]
    cli.main(["distill", "--out", str(tmp_path / "whole"), *args])
    whole = torch.load(tmp_path / "whole" / "student1.pt", weights_only=True)
    assert whole["distilled"] == {"steps": 1, "guide_w": 2.0, "teacher": "sprites"} and len(whole["history"]) == 6

    # the same run, stopped after its first checkpoint (update 3), then resumed: the same student, bit for bit
    real_save = cd.save_atomic

    def save_then_stop(obj, path):
        real_save(obj, path)
        if path.name == "checkpoint.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(cd, "save_atomic", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["distill", "--out", str(tmp_path / "parts"), *args])
    monkeypatch.setattr(cd, "save_atomic", real_save)
    with pytest.raises(SystemExit, match="already holds a distillation run; pass --resume"):
        cli.main(["distill", "--out", str(tmp_path / "parts"), *args])
    with pytest.raises(SystemExit, match="it has finished: copy its students with --export"):
        cli.main(["distill", "--out", str(tmp_path / "whole"), *args])
    with pytest.raises(SystemExit, match="no distillation run in"):
        cli.main(["distill", "--out", str(tmp_path / "nothing"), *args, "--resume"])
    with pytest.raises(SystemExit, match="checkpoint_every must be a positive integer"):
        cli.main(["distill", "--out", str(tmp_path / "bad"), *args, "--checkpoint-every", "0"])
    with pytest.raises(SystemExit, match=r"^distill: --resume: lr=0.0002 in the run, now 0.001"):
        cli.main(["distill", "--out", str(tmp_path / "parts"), *args, "--lr", "1e-3", "--resume"])
    with pytest.raises(SystemExit, match="has not finished"):
        cli.main(["distill", "--out", str(tmp_path / "parts"), *args, "--export", "--ship", "1",
                  "--weights-dir", str(tmp_path / "w")])
    cli.main(["distill", "--out", str(tmp_path / "parts"), *args, "--resume"])
    resumed = torch.load(tmp_path / "parts" / "student1.pt", weights_only=True)
    assert all(torch.equal(whole["state_dict"][k], resumed["state_dict"][k]) for k in whole["state_dict"])
    assert not (tmp_path / "parts" / "checkpoint.pt").exists()

    # export: only where asked, fp16 files with manifest entries; a run folder inside weights/ is refused
    with pytest.raises(SystemExit, match="inside the shipped weights"):
        cli.main(["distill", "--out", str(du.WEIGHTS_DIR / "run"), *args])
    with pytest.raises(SystemExit, match="makes students of"):
        cli.main(["distill", "--out", str(tmp_path / "whole"), *args, "--export", "--ship", "4",
                  "--weights-dir", str(tmp_path / "w")])
    cli.main(["distill", "--out", str(tmp_path / "whole"), "--updates", "99", "--export", "--ship", "1",
              "--weights-dir", str(tmp_path / "w")])   # the manifest records the run's settings, not these flags
    entry = read_manifest(tmp_path / "w")["sprites_student1"]
    assert entry["config"]["updates"] == [6] and entry["config"]["batch_size"] == 4
    assert entry["teacher_sha256"] == json.loads((tmp_path / "whole" / "run.json").read_text())["teacher_sha256"]
    assert entry["sha256"] == sha256_file(tmp_path / "w" / "sprites_student1.pt") and entry["seed"] == 0
    assert entry["config"]["teacher_steps"] == 2 and entry["command"].startswith("python diffusion_utilities.py distill")
    student = du.load_pretrained("sprites_student1", "cpu", weights_dir=tmp_path / "w")
    assert student.distilled["steps"] == 1
    assert len(json.loads((tmp_path / "w" / "sprites_student_loss.json").read_text())["loss"]["1"]) == 1
    assert not (du.WEIGHTS_DIR / "run").exists()
    np.testing.assert_allclose(student.state_dict()["out.3.weight"].numpy(),
                               whole["state_dict"]["out.3.weight"].half().float().numpy())


def test_sample_command_draws_a_student_with_its_own_calls(tmp_path):
    cli.main(["sample", "--model", "sprites_student1", "--per-class", "2", "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="distilled for 1 DDIM call"):
        cli.main(["sample", "--model", "sprites_student1", "--steps", "4", "--out", str(tmp_path / "t.png")])


def test_a_student_distilled_without_guidance_may_be_guided():
    student = du.ContextUnet(n_feat=8, prediction="v").eval()
    student.distilled = {"steps": 2, "guide_w": 0.0, "teacher": "sprites"}
    schedule = du.make_schedule(500)
    x, _ = du.sample_ddim(student, 2, schedule, n_steps=2, context=torch.tensor([0, 1]), guide_w=2.0)
    assert bool(torch.isfinite(x).all())
    student.distilled["guide_w"] = 2.0
    with pytest.raises(ValueError, match="guide_w=0"):
        du.sample_ddim(student, 2, schedule, n_steps=2, context=torch.tensor([0, 1]), guide_w=2.0)
