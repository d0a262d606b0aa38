"""The lessons' words, checked against one another (the cells check them against their own outputs):

- one story of the numbers: a registered fact (the training wait, the judge's accuracy, the parameter count...)
  has one value in every notebook and the README, and where the fact is a file's number, that number;
- taught before used: a registered term appears before the cell that teaches it only in a sentence that
  points to that notebook;
- every notebook says how long its core path takes and keeps its optional depth in one "Going further" part
  at its end;
- every "Predict, then run" question is answered by a static output (not only by a slider).
"""
import json
import re
import sys
from pathlib import Path

import pytest

import diffusion_utilities as du

ROOT = Path(du.__file__).resolve().parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
METRICS = json.loads((ROOT / "weights" / "metrics.json").read_text())
UNGUIDED = next(r for r in METRICS["guidance"] if r["guide_w"] == 0 and not r.get("guide_interval"))


def cells(path):
    return json.loads(path.read_text())["cells"]


def text(cell):
    return "".join(cell["source"])


def prose():
    """(where, text) for every markdown cell of every notebook, and the README."""
    found = [(f"{nb.name} cell {i}", text(c)) for nb in NOTEBOOKS for i, c in enumerate(cells(nb))
             if c["cell_type"] == "markdown"]
    return found + [("README.md", (ROOT / "README.md").read_text())]


def code():
    return [(f"{nb.name} cell {i}", text(c)) for nb in NOTEBOOKS for i, c in enumerate(cells(nb))
            if c["cell_type"] == "code"]


# -- one story of the numbers --------------------------------------------------------------------------
# name: (pattern with one group, where to look, the value it must have or None for "all the same")
FACTS = {
    "the training wait in seconds": (r"MAX_WAIT\W{0,3}\s*(?:=|,)?\s*(\d+)\b", "both", None),
    "the notebook run's most steps": (r"TRAIN_STEPS\s*=\s*(\d+)|up to (\d+)\b|the (\d+) steps take", "both", None),
    "the judge's accuracy on held-out real sprites": (
        r"(?:judge|classifier)[^.]*?right on\s+(\d+)%|(\d+)% of held-out real sprites", "prose",
        f"{round(100 * METRICS['classifier_test_accuracy']['all'])}"),
    "the judge's accuracy averaged over classes": (r"(\d+)% (?:per class on average|averaged over classes)", "prose",
                                                   None),
    "the sprite-FID floor at n = 1,000": (r"floor[^.]{0,60}?\b(0\.\d\d)\b", "prose", f"{METRICS['floor']['fid']:.2f}"),
    "the network's parameters": (r"(\d\.\d\d) ?(?:M|million) (?:trainable )?parameters", "prose", "1.48"),
    "the sprites in the data": (r"\b(\d,\d{3}) (?:pixel-art |training )?sprites", "prose", "2,718"),
    "the food sprites": (r"\b(\d+) of the 2,718(?: training)? sprites", "prose", "48"),
    "the number of steps T": (r"\bT = (\d+)", "prose", "500"),
    "what the shipped network outputs": (
        r"shipped (?:network|model)[^.]{0,40}?(?:outputs|predicts|was trained on|trained to output) "
        r"(?:a closely related target, )?(\$v\$|v\b|\$?\\epsilon\$?|the noise|noise|a mix of noise and image)",
        "prose", "$v$"),
    "an untrained network's plain noise error": (r"plain noise error[^.]{0,60}?about (\d)", "prose", "1"),
    "the share recognised without guidance": (r"(\d+)% without guidance", "prose",
                                              f"{round(100 * UNGUIDED['balanced_accuracy'])}"),
}


def fact_values(pattern, where):
    texts = (prose() if where in ("prose", "both") else []) + (code() if where in ("code", "both") else [])
    values = {}
    for place, body in texts:
        for match in re.finditer(pattern, body, flags=re.S):
            value = next(g for g in match.groups() if g is not None)
            values.setdefault(value, []).append(place)
    return values


def disagreements(facts):
    """Facts stated with more than one value, or with a value other than the registered one."""
    problems = []
    for name, (pattern, where, expected) in facts.items():
        values = fact_values(pattern, where)
        if not values:
            problems.append(f"{name}: not stated anywhere (is the pattern stale?)")
        elif len(values) > 1 or (expected is not None and expected not in values):
            problems.append(f"{name}: {values} (expected {expected})")
    return problems


def test_every_registered_fact_has_one_value_across_the_course():
    assert not disagreements(FACTS), "\n".join(disagreements(FACTS))


def test_a_contradiction_between_two_notebooks_is_caught(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "prose", lambda: [
        ("a", "The judge is right on 96% of held-out real sprites."),
        ("b", "Our judge is right on 95% of them.")])
    facts = {"judge": FACTS["the judge's accuracy on held-out real sprites"]}
    assert disagreements(facts) and "95" in disagreements(facts)[0]


def test_the_wait_in_the_code_is_the_wait_in_the_words():
    values = fact_values(*FACTS["the training wait in seconds"][:2])
    places = [p for ps in values.values() for p in ps]
    assert any("03_training" in p for p in places) and any(p == "README.md" for p in places), values


# -- taught before used --------------------------------------------------------------------------------
# term: (pattern, notebook that teaches it, a phrase of the cell that teaches it)
TERMS = {
    "the original course": (r"\bthe original course\b", 1, "we call it **the original"),
    "DDIM": (r"\bDDIM\b", 6, "DDIM (Song et al. 2020) builds"),
    "classifier-free guidance": (r"\bguidance\b|\bguided\b", 5, "## Classifier-free guidance"),
    "the posterior": (r"\bposterior\b", 4, "Bayes' rule combines them"),
    "KL divergence": (r"\bKL\b", 4, "**KL divergence**"),
    "FID": (r"\bFID\b", 3, "**Sprite-FID** passes"),
    "Inception": (r"\bInception\b", 3, "*Inception*, a large network"),
    "EMA": (r"\bEMA\b", 3, "the **EMA** (exponential moving average)"),
    "bf16": (r"\bbf16\b", 3, "**bf16**\n(bfloat16"),
    "SNR": (r"\bSNR\b|signal-to-noise", 3, "**Min-SNR-5 weighting**"),
    "v-prediction": (r"v-prediction|\$v\$", 2, "a closely related target, $v$"),
    "residual block": (r"\bresidual\b", 2, "*residual* block: it adds its input"),
    "ODE": (r"\bODE\b", 7, "*ordinary differential equation* (ODE)"),
    "Euler's method": (r"\bEuler", 7, "**Euler's method**"),
}


def course_markdown():
    """[(notebook number, cell index, text)] for every markdown cell, in course order."""
    return [(int(nb.name[:2]), i, text(c)) for nb in NOTEBOOKS for i, c in enumerate(cells(nb))
            if c["cell_type"] == "markdown"]


def early_uses(term):
    pattern, teacher, phrase = TERMS[term]
    md = course_markdown()
    taught_at = [(n, i) for n, i, body in md if n == teacher and phrase in body]
    assert len(taught_at) == 1, f"{term}: the teaching phrase {phrase!r} must occur once in notebook {teacher}"
    early = []
    for n, i, body in md:
        if (n, i) >= taught_at[0]:
            break
        if n == teacher and i == 0:
            continue  # a notebook's opening may list what it will teach
        for sentence in re.split(r"(?<=[.!?])\s+|\n\n", body):
            points = re.search(rf"notebook {teacher}\b|notebooks \d(?: to|-|–) ?{teacher}\b|0{teacher}_\w+\.ipynb",
                               sentence)
            if re.search(pattern, sentence) and not points:
                early.append(f"notebook {n} cell {i}: {sentence.strip()[:120]}")
    return early


@pytest.mark.parametrize("term", TERMS)
def test_terms_are_taught_before_they_are_used(term):
    assert not early_uses(term), f"{term} used before notebook {TERMS[term][1]} teaches it:\n" + "\n".join(
        early_uses(term))


# -- the shape of a lesson -------------------------------------------------------------------------------

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_states_its_core_path_and_ends_with_going_further(nb):
    body = cells(nb)
    minutes = re.search(r"\*\*Core path: about (\d+) minutes\*\*", text(body[0]))
    assert minutes and 10 <= int(minutes.group(1)) <= 35, f"{nb.name}: its opening must state its core path"
    assert "**Going further**" in text(body[0]), f"{nb.name}: its opening must say what the optional part holds"
    headings = [(i, line) for i, c in enumerate(body) if c["cell_type"] == "markdown"
                for line in text(c).splitlines() if line.startswith("## ")]
    further = [i for i, line in headings if line.startswith("## Going further")]
    assert len(further) == 1, f"{nb.name}: one '## Going further' part, got {len(further)}"
    assert headings[-1][1].startswith("## Going further"), f"{nb.name}: the Going further part must come last"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_predictions_are_answered_by_a_static_output(nb):
    body = cells(nb)
    asks = [i for i, c in enumerate(body) if c["cell_type"] == "markdown" and "**Predict, then run.**" in text(c)]
    assert asks, f"{nb.name} has no predict-then-run question"
    for i in asks:
        answer = next(c for c in body[i + 1:] if c["cell_type"] == "code")
        src = text(answer)
        assert "interact" not in src and "NBVAL_IGNORE_OUTPUT" not in src, (
            f"{nb.name} cell {i}: the prediction is answered only by a widget; print or draw the answer first")
        assert re.search(r"print\(|show_images|plt\.|imshow", src), f"{nb.name} cell {i}: nothing shown"


def test_an_early_use_without_a_pointer_is_caught(monkeypatch):
    md = [(1, 0, "Forward noising."), (1, 5, "Then DDIM samples it."), (4, 3, "DDIM comes in notebook 6."),
          (6, 4, "DDIM (Song et al. 2020) builds a family.")]
    monkeypatch.setattr(sys.modules[__name__], "course_markdown", lambda: md)
    assert early_uses("DDIM") == ["notebook 1 cell 5: Then DDIM samples it."]
