"""The notebooks' exercises: every hidden solution passes its checker, every checker names a known wrong
answer, an untouched stub lets the lesson go on, and every notebook has its exercises and a prediction."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from standin_device import StandinDevice

import diffusion_utilities as du
from course_tools import exercises

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTION = re.compile(r"<details><summary>Solution[^<]*</summary>\s*```python\n(.*?)```\s*</details>", re.S)


def cells(nb, kind):
    return ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == kind]


def solutions():
    """(notebook, exercise name, the solution's function) for every hidden solution in the notebooks."""
    found = []
    for nb in NOTEBOOKS:
        for block in SOLUTION.findall("\n".join(cells(nb, "markdown"))):
            namespace = {"torch": torch, "F": F, "du": du, "np": np}
            exec(compile(block, f"{nb.name} solution", "exec"), namespace)
            found += [(nb.name, name[3:], fn) for name, fn in namespace.items() if name.startswith("my_")]
    return found


SOLUTIONS = solutions()


def test_every_notebook_has_two_exercises_and_a_prediction():
    for nb in NOTEBOOKS:
        code = "\n".join(cells(nb, "code"))
        checked = set(re.findall(r"\bcheck_(\w+)\(my_\1\)", code))
        solved = {name for where, name, _ in SOLUTIONS if where == nb.name}
        assert len(checked) >= 2, f"{nb.name}: {sorted(checked)}"
        assert checked == solved, f"{nb.name}: checked {sorted(checked)} but solutions for {sorted(solved)}"
        for name in checked:  # the committed notebook holds the stub, not the answer
            stub = re.search(rf"def my_{name}\(.*?\n(?=\S)", code + "\n#", re.S).group(0)
            assert "raise NotImplementedError" in stub, f"{nb.name}: my_{name} should be a stub"
        assert "**Predict, then run.**" in "\n".join(cells(nb, "markdown")), f"{nb.name}: no prediction question"


@pytest.mark.parametrize("where, name, fn", SOLUTIONS, ids=[f"{w[:2]}-{n}" for w, n, _ in SOLUTIONS])
def test_solution_passes_its_checker(where, name, fn, capsys):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    used = getattr(exercises, f"check_{name}")(fn)
    assert torch.equal(torch.get_rng_state(), before), "a checker must not move the learner's random numbers"
    out = capsys.readouterr().out
    assert out.strip() == f"{name}: correct", out
    assert used is fn, "a right answer is the function the lesson goes on with"


@pytest.mark.parametrize("name", sorted({n for _, n, _ in SOLUTIONS}))
def test_an_untouched_stub_lets_the_lesson_go_on(name, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError

    used = getattr(exercises, f"check_{name}")(stub)
    assert "not answered yet" in capsys.readouterr().out
    assert callable(used) and used is not stub


def course_perturb_input(x, t, noise, schedule):  # the original course's bug
    ab = schedule.ab_t[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x + (1 - ab) * noise


def off_by_one_perturb(x, t, noise, schedule):
    ab = schedule.ab_t[t - 1].view(-1, 1, 1, 1)
    return ab.sqrt() * x + (1 - ab).sqrt() * noise


def ddpm_sigma_guess(t, t_prev, eta, schedule):  # the natural guess that notebook 6 warns about
    return eta * schedule.b_t[t].sqrt()


def loss_with_t_from_zero(model, x, c, schedule, drop_prob=0.1, generator=None):
    B = x.shape[0]
    t = torch.randint(0, schedule.T, (B,), generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    keep = (torch.rand(B, generator=generator) >= drop_prob).float()
    return F.mse_loss(model(du.perturb_input(x, t, noise, schedule), t / schedule.T, c * keep[:, None]), noise)


def one_teacher_step(teacher, x0, noise, t, t_mid, t_next, s, c, w):
    x_t = du.perturb_input(x0, t, noise, s)
    return x_t, du.predict_x0(x_t, t, du.predict_noise(teacher, x_t, t, s, c, w), s)


def noised_twice(teacher, x0, noise, t, t_mid, t_next, s, c, w):
    return exercises.distillation_pair(teacher, du.perturb_input(x0, t, noise, s), noise, t, t_mid, t_next, s, c, w)


def solved_at_the_midpoint(teacher, x0, noise, t, t_mid, t_next, s, c, w):
    """Two teacher steps, then solved with t_mid's alpha and sigma instead of t_next's."""
    x_t = du.perturb_input(x0, t, noise, s)
    z = x_t
    for a, b in ((t, t_mid), (t_mid, t_next)):
        z = du.denoise_ddim(z, a, b, du.predict_noise(teacher, z, a, s, c, w), s)
    ab, ab_mid = s.ab_t[t], s.ab_t[t_mid]
    ratio = ((1 - ab_mid) / (1 - ab)).sqrt()
    return x_t, (z - ratio * x_t) / (ab_mid.sqrt() - ratio * ab.sqrt())


WRONG = [
    ("alpha_bar", lambda b: torch.cumprod(1 - b, 0), "ab_t[0] must be 1"),
    ("alpha_bar", lambda b: torch.cat([torch.ones(1), 1 - torch.cumsum(b[1:], 0)]), "That is a sum"),
    ("perturb_input", course_perturb_input, "the original course wrote"),
    ("perturb_input", off_by_one_perturb, "Off by one"),
    ("perturb_input", lambda x, t, noise, s: s.ab_t[t].sqrt() * x + (1 - s.ab_t[t]).sqrt() * noise,
     "Shape ab_t[t] to (B, 1, 1, 1)"),
    ("embed", lambda emb, v: emb.model[2](emb.model[0](v))[:, :, None, None], "GELU between the two layers"),
    ("embed", lambda emb, v: emb.model(v), "wrong shape"),
    ("condition", lambda u, cemb, temb: temb * u + cemb, "swapped roles"),
    ("diffusion_loss", loss_with_t_from_zero, "Draw t from 1..T"),
    ("velocity", lambda x0, n, t, s: s.ab_t[t].view(-1, 1, 1, 1).sqrt() * x0 - (1 - s.ab_t[t].view(-1, 1, 1, 1)).sqrt() * n,
     "sign is flipped"),
    ("min_snr_weight", lambda snr, gamma: snr.clamp(max=gamma) / snr, "eps-prediction loss"),
    ("denoise_add_noise", lambda x, t, e, s, z: (x - e * s.b_t[t] / (1 - s.ab_t[t]).sqrt()) / s.a_t[t].sqrt(),
     "fresh noise"),
    ("posterior", lambda x0, xt, t, s: (du.posterior(x0, xt, t, s)[0], s.b_t[t]), "beta-tilde"),
    ("guidance", lambda c, u, w: w * c + (1 - w) * u, "At w = 0"),
    ("rescale", lambda g, c, phi: g * c.std(dim=(1, 2, 3), keepdim=True) / g.std(dim=(1, 2, 3), keepdim=True),
     "Blend with phi"),
    ("denoise_ddim", lambda x, t, tp, e, s: s.a_t[tp].sqrt() * (x - (1 - s.a_t[t]).sqrt() * e) / s.a_t[t].sqrt()
     + (1 - s.a_t[tp]).sqrt() * e, "Use alpha-bar"),
    ("ddim_sigma", ddpm_sigma_guess, "DDPM's noise for one step"),
    ("slerp", lambda a, b, t: (1 - t) * a + t * b, "straight line"),
    ("invert_step", lambda x, tp, t, e, s: du.denoise_ddim(x, t, tp, e, s), "forward DDIM step"),
    ("flow_target", lambda x0, e, s: (exercises.flow_target(x0, e, s)[0], x0 - e), "wrong sign"),
    ("flow_target", lambda x0, e, s: exercises.flow_target(e, x0, s), "Time runs the wrong way"),
    ("ddpm_to_flow", lambda v, x, t, s: (x, *exercises.ddpm_to_flow(v, x, t, s)[1:]), "Rescale the state"),
    ("ddpm_to_flow", lambda v, x, t, s: (*exercises.ddpm_to_flow(v, x, t, s)[:2], -exercises.ddpm_to_flow(v, x, t, s)[2]),
     "eps and x0 are swapped"),
    ("distillation_pair", one_teacher_step, "ONE-step guess"),
    ("distillation_pair", noised_twice, "noised twice"),
    ("distillation_pair", solved_at_the_midpoint, "Wrong time in the solve"),
    ("student_v_target", lambda xt_, x, n, t, s: s.ab_t[t].sqrt() * n - (1 - s.ab_t[t]).sqrt() * xt_, "noise you drew"),
    ("student_v_target", lambda xt_, x, n, t, s: -exercises.student_v_target(xt_, x, n, t, s), "sign is flipped"),
]


@pytest.mark.parametrize("name, wrong, says", WRONG, ids=[f"{n}-{s[:20]}" for n, _, s in WRONG])
def test_checker_names_a_wrong_answer(name, wrong, says, capsys):
    used = getattr(exercises, f"check_{name}")(wrong)
    out = capsys.readouterr().out
    assert says in out and ("not yet" in out or "wrong shape" in out or "raised" in out), out
    assert used is not wrong


def test_every_checker_has_a_named_wrong_answer_tested():
    assert {n for n, _, _ in WRONG} == {n[6:] for n in dir(exercises) if n.startswith("check_")}


def test_a_crashing_answer_is_reported_and_the_lesson_goes_on(capsys):
    used = exercises.check_perturb_input(lambda x, t, noise, schedule: x + schedule.alpha_bar)
    out = capsys.readouterr().out
    assert "your function raised AttributeError" in out and "du.perturb_input" in out
    assert used is du.perturb_input


def test_an_answer_far_off_is_measured(capsys):
    exercises.check_perturb_input(lambda x, t, noise, schedule: x + 0.5)
    assert "differs from the course's by up to" in capsys.readouterr().out


def test_every_notebook_cell_has_its_own_id():
    # nbformat 4.5 wants one (a missing id is a warning today and "will become a hard error")
    for nb in NOTEBOOKS:
        ids = [c.get("id") for c in json.loads(nb.read_text())["cells"]]
        assert None not in ids and len(set(ids)) == len(ids), nb.name


@pytest.mark.parametrize("where, name, fn", SOLUTIONS, ids=[f"{w[:2]}-{n}" for w, n, _ in SOLUTIONS])
def test_checkers_run_where_a_gpu_is_visible(where, name, fn, capsys):
    """On Colab's GPU runtime torch.cuda.is_available() is True: a checker must not touch CUDA's random
    state or put its fixed inputs on the GPU (fork_rng() without devices=[] initialises CUDA)."""
    with StandinDevice("cuda"):
        getattr(exercises, f"check_{name}")(fn)
    assert capsys.readouterr().out.strip() == f"{name}: correct"
