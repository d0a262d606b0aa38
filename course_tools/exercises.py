"""The notebooks' exercises: `check_<name>(my_<name>)` for each function a learner writes.

A checker runs the learner's function on fixed inputs and compares it with the course's answer. It prints
"correct", or names the mistake when the output matches a known wrong answer (the original course's
missing square root, an off-by-one timestep, a swapped sign...), or says how far off it is. It returns the
function the lesson goes on with: the learner's when it is right, the module's otherwise, so "Run All" on
an untouched notebook (a stub that raises NotImplementedError) still runs to the end.

Notebooks import these by name: `from course_tools.exercises import check_perturb_input`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import diffusion_utilities as du


def _seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _judge(title, fn, run, want, mistakes=(), fallback=None, atol=1e-5, rtol=1e-4, shape_hint=""):
    """Run `run(fn)`, compare with `want`, name a mistake from `mistakes` [(message, wrong output)]."""
    if getattr(fallback, "__module__", "") == du.__name__:
        goes_on = f"the lesson goes on with du.{fallback.__name__}"
    else:
        goes_on = "the lesson goes on with the course's version"
    try:
        got = run(fn)
    except NotImplementedError:
        print(f"{title}: not answered yet. Write it in the cell above (a solution is below it); {goes_on}.")
        return fallback
    except Exception as err:  # the learner's code failed: say how, and keep the lesson going
        hint = f"\n{shape_hint}" if shape_hint and "size of tensor" in str(err) else ""  # a broadcasting slip
        print(f"{title}: your function raised {type(err).__name__}: {err}{hint}\n{goes_on[0].upper() + goes_on[1:]}.")
        return fallback
    if isinstance(want, tuple):
        if not isinstance(got, tuple) or len(got) != len(want):
            print(f"{title}: return {len(want)} values (a tuple), got {type(got).__name__}; {goes_on}.")
            return fallback
    got_t, want_t = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got_t, want_t):
        if not torch.is_tensor(g):
            print(f"{title}: return a tensor, got {type(g).__name__}; {goes_on}.")
            return fallback
        if g.shape != w.shape:
            print(f"{title}: wrong shape {tuple(g.shape)}, expected {tuple(w.shape)}. {shape_hint}".rstrip()
                  + f" ({goes_on})")
            return fallback

    def close(a, b):
        a, b = (a, b) if isinstance(b, tuple) else ((a,), (b,))
        return all(torch.allclose(x.float(), y.float(), atol=atol, rtol=rtol) for x, y in zip(a, b))

    if close(got, want):
        print(f"{title}: correct")
        return fn
    for message, wrong in mistakes:
        if close(got, wrong):
            print(f"{title}: not yet. {message} ({goes_on})")
            return fallback
    worst = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got_t, want_t))
    print(f"{title}: not yet. Your result differs from the course's by up to {worst:.3g}; compare your formula "
          f"with the one above the cell ({goes_on}).")
    return fallback


# -- notebook 1 -------------------------------------------------------------------------------------

def alpha_bar(b_t):
    """The course's answer: ab_t[0] = 1, ab_t[t] = prod_{s<=t} (1 - b_s)."""
    return torch.cat([torch.ones(1, dtype=b_t.dtype), torch.cumprod(1 - b_t[1:], 0)])


def check_alpha_bar(fn):
    """fn(b_t) -> ab_t: b_t (T + 1,) with b_t[0] unused; ab_t[0] = 1 and ab_t[t] = prod_{s<=t} (1 - b_s)."""
    b = du.make_schedule(500).b_t
    a = 1 - b
    want = alpha_bar(b)
    mistakes = [
        ("That is a sum: alpha-bar multiplies the kept fractions, torch.cumprod(1 - b_t[1:], 0).",
         torch.cat([torch.ones(1), 1 - torch.cumsum(b[1:], 0)])),
        ("Multiply the alphas (1 - beta), not the betas.", torch.cat([torch.ones(1), torch.cumprod(b[1:], 0)])),
        ("That is alpha_t for one step; alpha-bar is the product of all of them up to t.", torch.cat([torch.ones(1), a[1:]])),
        ("At t = 0 nothing is noised yet: ab_t[0] must be 1, and the product starts at t = 1.",
         torch.cumprod(a, 0)),
    ]
    return _judge("alpha_bar", fn, lambda f: f(b.clone()), want, mistakes, alpha_bar, atol=1e-7, rtol=2e-6,
                  shape_hint="ab_t has one value per step 0..T, like b_t: start with torch.ones(1) for t = 0.")


def check_perturb_input(fn):
    """fn(x, t, noise, schedule) -> x_t = sqrt(ab_t) x + sqrt(1 - ab_t) noise, t one step per image."""
    s = du.make_schedule(500)
    x, noise = _seeded(6, 3, 16, 16).clamp(-1, 1), _seeded(6, 3, 16, 16, seed=1)
    t = torch.tensor([1, 20, 100, 250, 400, 500])
    want = du.perturb_input(x, t, noise, s)

    def form(ab, sig, noi):
        ab = ab.view(-1, 1, 1, 1)
        return sig(ab) * x + noi(ab) * noise

    sqrt = torch.sqrt
    mistakes = [
        ("The noise needs a square root: sqrt(1 - ab_t) * noise (the original course wrote (1 - ab_t) * noise).",
         form(s.ab_t[t], sqrt, lambda ab: 1 - ab)),
        ("The image needs a square root too: sqrt(ab_t) * x.", form(s.ab_t[t], lambda ab: ab, lambda ab: sqrt(1 - ab))),
        ("Use alpha-bar (schedule.ab_t), what is left after all t steps, not one step's alpha (schedule.a_t).",
         form(s.a_t[t], sqrt, lambda ab: sqrt(1 - ab))),
        ("Off by one: x_t uses ab_t[t], not ab_t[t - 1].", form(s.ab_t[t - 1], sqrt, lambda ab: sqrt(1 - ab))),
        ("Image and noise are swapped: the image gets sqrt(ab_t), the noise sqrt(1 - ab_t).",
         form(s.ab_t[t], lambda ab: sqrt(1 - ab), sqrt)),
    ]
    return _judge("perturb_input", fn, lambda f: f(x, t, noise, s), want, mistakes, du.perturb_input,
                  shape_hint="Shape ab_t[t] to (B, 1, 1, 1) with .view(-1, 1, 1, 1) so each image gets its own step.")


# -- notebook 2 -------------------------------------------------------------------------------------

def embed(emb, v):
    """The course's answer: what du.EmbedFC.forward does."""
    return emb(v)


def check_embed(fn):
    """fn(emb, v) with emb a du.EmbedFC and v (B, input_dim) -> (B, emb_dim, 1, 1): Linear, GELU, Linear."""
    with torch.random.fork_rng(devices=[]):  # a fixed layer without touching the learner's random numbers
        torch.manual_seed(0)
        emb = du.EmbedFC(5, 32)
    v = _seeded(4, 5)
    first, last = emb.model[0], emb.model[2]
    with torch.no_grad():
        want = emb(v)
        mistakes = [
            ("The GELU between the two layers is missing: without it two Linear layers are one linear map.",
             last(first(v))[:, :, None, None]),
            ("The course uses GELU here, not ReLU.", last(F.relu(first(v)))[:, :, None, None]),
        ]
        return _judge("embed", fn, lambda f: f(emb, v), want, mistakes, embed,
                      shape_hint="Add two axes at the end, h[:, :, None, None], so the embedding broadcasts over "
                                 "the feature map's height and width.")


def condition(u, cemb, temb):
    """The course's answer: the context scales each channel, time shifts it."""
    return cemb * u + temb


def check_condition(fn):
    """fn(u, cemb, temb) -> cemb * u + temb: the context scales each channel, time shifts it."""
    u, cemb, temb = _seeded(2, 64, 8, 8), _seeded(2, 64, 1, 1, seed=1), _seeded(2, 64, 1, 1, seed=2)
    want = condition(u, cemb, temb)
    mistakes = [
        ("Time and context have swapped roles: the context multiplies, time adds.", temb * u + cemb),
        ("Both are added: the context should multiply (scale each channel), time add.", u + cemb + temb),
        ("Only the feature map is scaled: cemb * u + temb, not cemb * (u + temb).", cemb * (u + temb)),
    ]
    return _judge("condition", fn, lambda f: f(u, cemb, temb), want, mistakes, condition)


# -- notebook 3 -------------------------------------------------------------------------------------

def _loss_batch():
    images, labels, _ = du.load_sprites()
    idx = torch.linspace(0, len(images) - 1, 32).long()  # sprites spread over the whole file
    return du.to_tensor_images(images[idx.numpy()]), du.one_hot(torch.as_tensor(labels[idx.numpy()]))


def check_diffusion_loss(fn):
    """fn(model, x, c, schedule, drop_prob=0.1, generator=None) -> the eps-prediction loss, drawing t, the
    noise and the dropout mask from generator in that order (as du.diffusion_loss does)."""
    x, c = _loss_batch()
    s = du.make_schedule(500)
    with torch.random.fork_rng(devices=[]):  # a fixed network without touching the learner's random numbers
        torch.manual_seed(0)
        net = du.ContextUnet(n_feat=16, prediction="eps").eval()

    def gen():
        return torch.Generator().manual_seed(0)

    want = du.diffusion_loss(net, x, c, s, generator=gen())

    def variant(t_low=1, t_scale=True, target="noise", noised=True, dropout=True):
        g = gen()
        B = x.shape[0]
        t = torch.randint(t_low, s.T + t_low, (B,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        x_t = du.perturb_input(x, t, noise, s) if noised else x
        keep = (torch.rand(B, generator=g) >= 0.1).float() if dropout else torch.ones(B)
        pred = net(x_t, t / s.T if t_scale else t.float(), c * keep[:, None])
        return F.mse_loss(pred, noise if target == "noise" else x)

    with torch.no_grad():
        mistakes = [
            ("Draw t from 1..T: torch.randint(1, schedule.T + 1, ...); t = 0 is the clean image.", variant(t_low=0)),
            ("The network takes the time as a fraction, t / schedule.T, not the step number.", variant(t_scale=False)),
            ("The target is the noise that was added, not the clean image.", variant(target="x0")),
            ("The network must see the noised image x_t, not the clean x.", variant(noised=False)),
            ("Drop the context for about 10% of the images (c * keep[:, None]): guidance needs it (notebook 5).",
             variant(dropout=False)),
        ]
        return _judge("diffusion_loss", fn, lambda f: f(net, x, c, s, drop_prob=0.1, generator=gen()), want, mistakes,
                      du.diffusion_loss)


def check_velocity(fn):
    """fn(x0, noise, t, schedule) -> v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0."""
    s = du.make_schedule(500)
    x0, noise = _seeded(4, 3, 16, 16).clamp(-1, 1), _seeded(4, 3, 16, 16, seed=1)
    t = torch.tensor([1, 100, 300, 500])
    want = du.velocity(x0, noise, t, s)
    ab = s.ab_t[t].view(-1, 1, 1, 1)
    mistakes = [
        ("The sign is flipped: v = sqrt(ab_t) * noise - sqrt(1 - ab_t) * x0.", ab.sqrt() * x0 - (1 - ab).sqrt() * noise),
        ("The square roots are missing.", ab * noise - (1 - ab) * x0),
        ("The coefficients are swapped: the noise gets sqrt(ab_t), the image sqrt(1 - ab_t).",
         (1 - ab).sqrt() * noise - ab.sqrt() * x0),
    ]
    return _judge("velocity", fn, lambda f: f(x0, noise, t, s), want, mistakes, du.velocity,
                  shape_hint="Shape ab_t[t] to (B, 1, 1, 1) so each image gets its own step.")


def min_snr_weight(snr, gamma):
    """The course's answer: the Min-SNR-gamma weight for a v target (Hang et al. 2023)."""
    return snr.clamp(max=gamma) / (snr + 1)


def check_min_snr_weight(fn):
    """fn(snr, gamma) -> the Min-SNR-gamma weight for a v-prediction loss: min(snr, gamma) / (snr + 1)."""
    snr = du.snr(du.make_schedule(500))[1:]
    want = min_snr_weight(snr, 5.0)
    mistakes = [
        ("That is the weight for an eps-prediction loss, min(SNR, gamma) / SNR; a v-loss divides by SNR + 1.",
         snr.clamp(max=5.0) / snr),
        ("Clip from above: min(SNR, gamma), i.e. snr.clamp(max=gamma).", snr.clamp(min=5.0) / (snr + 1)),
        ("Not clipped at gamma: that is the plain v-loss's weight, SNR / (SNR + 1).", snr / (snr + 1)),
    ]
    return _judge("min_snr_weight", fn, lambda f: f(snr.clone(), 5.0), want, mistakes, min_snr_weight)


# -- notebook 4 -------------------------------------------------------------------------------------

def check_denoise_add_noise(fn):
    """fn(x, t, pred_noise, schedule, z) -> (x - beta_t / sqrt(1 - ab_t) eps) / sqrt(a_t) + sqrt(beta_t) z."""
    s = du.make_schedule(500)
    x, eps, z = _seeded(4, 3, 16, 16), _seeded(4, 3, 16, 16, seed=1), _seeded(4, 3, 16, 16, seed=2)
    ts = (500, 250, 10)
    want = tuple(du.denoise_add_noise(x, t, eps, s, z=z) for t in ts)

    def variant(t, denom=lambda ab: (1 - ab).sqrt(), keep=lambda a: a.sqrt(), noise=True, sign=-1):
        a, b, ab = s.a_t[t], s.b_t[t], s.ab_t[t]
        return (x + sign * eps * b / denom(ab)) / keep(a) + (b.sqrt() * z if noise else 0)

    mistakes = [
        ("The fresh noise sqrt(beta_t) * z is missing (the end of this notebook shows what it is for).",
         tuple(variant(t, noise=False) for t in ts)),
        ("Divide by sqrt(1 - ab_t), with the square root.", tuple(variant(t, denom=lambda ab: 1 - ab) for t in ts)),
        ("Divide by sqrt(a_t), one step's alpha, not by sqrt(ab_t).",
         tuple(variant(t, keep=lambda a, t=t: s.ab_t[t].sqrt()) for t in ts)),
        ("Subtract the predicted noise; adding it makes the image noisier.", tuple(variant(t, sign=1) for t in ts)),
    ]
    return _judge("denoise_add_noise", fn, lambda f: tuple(f(x, t, eps, s, z) for t in ts), want, mistakes,
                  du.denoise_add_noise)


def check_posterior(fn):
    """fn(x0, x_t, t, schedule) -> (mean, variance) of q(x_{t-1} | x_t, x_0); variance a 0-dim tensor."""
    s = du.make_schedule(500)
    x0, x_t = _seeded(2, 3, 16, 16).clamp(-1, 1), _seeded(2, 3, 16, 16, seed=1)
    t = 300
    want = du.posterior(x0, x_t, t, s)
    mean = want[0]
    a, b, ab = s.a_t[t], s.b_t[t], s.ab_t[t]
    mistakes = [
        ("The mean is right; the variance is beta-tilde = (1 - ab_{t-1}) / (1 - ab_t) * beta_t, not beta_t.",
         (mean, s.b_t[t])),
        ("The posterior needs ab_{t-1} = schedule.ab_t[t - 1] beside ab_t, not ab_t twice.",
         (ab.sqrt() * b / (1 - ab) * x0 + a.sqrt() * x_t, b)),
        ("Off by one: at step t use a_t, b_t, ab_t and ab_{t-1} = schedule.ab_t[t - 1].", du.posterior(x0, x_t, t + 1, s)),
    ]
    return _judge("posterior", fn, lambda f: tuple(f(x0, x_t, t, s)), want, mistakes, du.posterior)


# -- notebook 5 -------------------------------------------------------------------------------------

def guidance(out_c, out_u, w):
    """The course's answer: classifier-free guidance."""
    return (1 + w) * out_c - w * out_u


def check_guidance(fn):
    """fn(out_c, out_u, w) -> (1 + w) out_c - w out_u (classifier-free guidance, Ho & Salimans 2022)."""
    out_c, out_u = _seeded(4, 3, 16, 16), _seeded(4, 3, 16, 16, seed=1)
    ws = (0.0, 2.0, 4.0)
    want = tuple(guidance(out_c, out_u, w) for w in ws)
    mistakes = [
        ("At w = 0 guidance must give the conditional output unchanged: (1 + w) * out_c - w * out_u, not a "
         "blend w * out_c + (1 - w) * out_u.", tuple(w * out_c + (1 - w) * out_u for w in ws)),
        ("The signs are swapped: guidance moves away from the unconditional output, (1 + w) * out_c - w * out_u.",
         tuple((1 + w) * out_u - w * out_c for w in ws)),
        ("Guidance adds w times the difference out_c - out_u to out_c.", tuple(out_c + w * out_u for w in ws)),
    ]
    return _judge("guidance", fn, lambda f: tuple(f(out_c, out_u, w) for w in ws), want, mistakes, guidance)


def check_rescale(fn):
    """fn(guided, cond, phi) -> du.rescale_guidance: each sample scaled to cond's std, blended by phi."""
    g, c = 3 * _seeded(4, 3, 16, 16), _seeded(4, 3, 16, 16, seed=1)
    want = du.rescale_guidance(g, c, 0.7)

    def std(z, dims=(1, 2, 3)):
        return z.std(dim=dims, keepdim=True)

    mistakes = [
        ("Blend with phi: phi * rescaled + (1 - phi) * guided.", g * std(c) / std(g)),
        ("Scale each sample by its own standard deviation (dim=(1, 2, 3)), not the whole batch's.",
         0.7 * g * c.std() / g.std() + 0.3 * g),
        ("The ratio is upside down: multiply by std(cond) / std(guided).", 0.7 * g * std(g) / std(c) + 0.3 * g),
    ]
    return _judge("rescale", fn, lambda f: f(g, c, 0.7), want, mistakes, du.rescale_guidance)


# -- notebook 6 -------------------------------------------------------------------------------------

def check_denoise_ddim(fn):
    """fn(x, t, t_prev, pred_noise, schedule) -> the deterministic (eta = 0) DDIM step."""
    s = du.make_schedule(500)
    x, eps = _seeded(4, 3, 16, 16), _seeded(4, 3, 16, 16, seed=1)
    pairs = ((500, 480), (300, 0), (20, 7))
    want = tuple(du.denoise_ddim(x, t, tp, eps, s) for t, tp in pairs)

    def variant(t, tp, table=s.ab_t, root=torch.sqrt, x0_with_prev=False):
        ab, ab_prev = table[t], table[tp]
        seen = ab_prev if x0_with_prev else ab
        x0 = (x - root(1 - seen) * eps) / root(seen)
        return root(ab_prev) * x0 + root(1 - ab_prev) * eps

    mistakes = [
        ("Use alpha-bar (schedule.ab_t): DDIM jumps straight between the marginals q(x_t | x_0).",
         tuple(variant(t, tp, table=s.a_t) for t, tp in pairs)),
        ("The square roots are missing.", tuple(variant(t, tp, root=lambda v: v) for t, tp in pairs)),
        ("x is at step t: estimate x_0 with ab_t, then re-noise it to ab_{t_prev}.",
         tuple(variant(t, tp, x0_with_prev=True) for t, tp in pairs)),
    ]
    return _judge("denoise_ddim", fn, lambda f: tuple(f(x, t, tp, eps, s) for t, tp in pairs), want, mistakes,
                  du.denoise_ddim)


def check_ddim_sigma(fn):
    """fn(t, t_prev, eta, schedule) -> eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)."""
    s = du.make_schedule(500)
    cases = ((500, 480, 1.0), (300, 200, 0.5), (20, 0, 1.0), (100, 99, 1.0))
    want = tuple(torch.as_tensor(du.ddim_sigma(t, tp, e, s)).float() for t, tp, e in cases)

    def run(f):
        return tuple(torch.as_tensor(f(t, tp, e, s)).float() for t, tp, e in cases)

    mistakes = [
        ("eta * sqrt(beta_t) is DDPM's noise for one step; a DDIM jump from t to t_prev needs "
         "eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev).",
         tuple(e * s.b_t[t].sqrt() for t, tp, e in cases)),
        ("That is the variance; sigma is its square root.", tuple(du.ddim_sigma(t, tp, e, s) ** 2 / e for t, tp, e in cases)),
        ("Both factors are needed: sqrt((1 - ab_prev) / (1 - ab_t)) and sqrt(1 - ab_t / ab_prev).",
         tuple(e * (1 - s.ab_t[t] / s.ab_t[tp]).sqrt() for t, tp, e in cases)),
    ]
    return _judge("ddim_sigma", fn, run, want, mistakes, du.ddim_sigma)


# -- notebook 7 -------------------------------------------------------------------------------------

def check_slerp(fn):
    """fn(a, b, t) -> du.slerp(a, b, t): per-sample spherical interpolation."""
    a, b = _seeded(3, 3, 16, 16), _seeded(3, 3, 16, 16, seed=1)
    ts = (0.0, 0.3, 0.5, 1.0)
    want = tuple(du.slerp(a, b, t) for t in ts)
    mistakes = [
        ("That is a straight line, (1 - t) a + t b: at t = 0.5 its norm drops by about 1/sqrt(2).",
         tuple((1 - t) * a + t * b for t in ts)),
        ("Measure the angle per sample (flatten(1), then sum over dim 1), not over the whole batch.",
         tuple(_batch_slerp(a, b, t) for t in ts)),
    ]
    return _judge("slerp", fn, lambda f: tuple(f(a, b, t) for t in ts), want, mistakes, du.slerp, atol=1e-4)


def _batch_slerp(a, b, t):
    theta = torch.arccos((a * b).sum() / (a.norm() * b.norm()))
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def invert_step(x, t_prev, t, pred_noise, schedule):
    """The course's answer: the eta-0 DDIM step from t_prev up to the noisier t."""
    ab, ab_prev = schedule.ab_t[t], schedule.ab_t[t_prev]
    x0 = (x - (1 - ab_prev).sqrt() * pred_noise) / ab_prev.sqrt()
    return ab.sqrt() * x0 + (1 - ab).sqrt() * pred_noise


def check_invert_step(fn):
    """fn(x, t_prev, t, pred_noise, schedule) -> x at the noisier step t: the eta-0 DDIM step run backwards."""
    s = du.make_schedule(500)
    x, eps = _seeded(4, 3, 16, 16).clamp(-1, 1), _seeded(4, 3, 16, 16, seed=1)
    pairs = ((0, 20), (100, 120), (400, 500))

    want = tuple(invert_step(x, tp, t, eps, s) for tp, t in pairs)
    mistakes = [  # estimating x_0 with ab_t and re-noising it to ab_t gives x back unchanged
        ("x is at the cleaner step t_prev: estimate x_0 with ab_{t_prev}, then noise it to ab_t.",
         tuple(x for _ in pairs)),
        ("That is the forward DDIM step (towards the image); inversion goes from t_prev up to t.",
         tuple(du.denoise_ddim(x, t, tp, eps, s) for tp, t in pairs)),
    ]
    return _judge("invert_step", fn, lambda f: tuple(f(x, tp, t, eps, s) for tp, t in pairs), want, mistakes,
                  invert_step)



# -- notebook 8 -------------------------------------------------------------------------------------

def flow_target(x0, eps, s):
    """The course's answer: the straight path's point x_s = (1 - s) x0 + s eps and its velocity u = eps - x0."""
    s = s.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * eps, eps - x0


def check_flow_target(fn):
    """fn(x0, eps, s) -> (x_s, u): x0, eps (B, C, H, W), s (B,) in [0, 1]; s = 1 is pure noise."""
    x0, eps = _seeded(4, 3, 16, 16).clamp(-1, 1), _seeded(4, 3, 16, 16, seed=1)
    s = torch.tensor([0.1, 0.4, 0.7, 0.95])
    x_s, u = flow_target(x0, eps, s)
    backwards = flow_target(eps, x0, s)[0]  # the path started at the noise: s x0 + (1 - s) eps
    mistakes = [
        ("The velocity has the wrong sign: u = d x_s / d s = eps - x0 (noise minus image), since x_s moves "
         "towards the noise as s grows.", (x_s, -u)),
        ("alpha and sigma are swapped: the image gets alpha = 1 - s and the noise sigma = s.", (backwards, u)),
        ("Time runs the wrong way: in the course (and SD3, diffusers) s = 1 is the noise and s = 0 the image. "
         "Your path starts at the noise, as in the rectified-flow paper, whose velocity is x0 - eps.", (backwards, -u)),
    ]
    return _judge("flow_target", fn, lambda f: f(x0, eps, s), (x_s, u), mistakes, flow_target,
                  shape_hint="Shape s to (B, 1, 1, 1) so each image gets its own time: s.view(-1, 1, 1, 1).")


def ddpm_to_flow(v_hat, x_t, t, schedule):
    """The course's answer: a v-model's output at DDPM's x_t, as a point z, time s and velocity u of the straight path."""
    ab = schedule.ab_t[t].view(-1, 1, 1, 1)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    eps, x0 = alpha * v_hat + sigma * x_t, alpha * x_t - sigma * v_hat  # alpha^2 + sigma^2 = 1 on DDPM's path
    return x_t / (alpha + sigma), (sigma / (alpha + sigma)).view(-1), eps - x0


def check_ddpm_to_flow(fn):
    """fn(v_hat, x_t, t, schedule) -> (z, s, u): z (B, C, H, W), s (B,), u (B, C, H, W); t a LongTensor (B,)."""
    sched = du.make_schedule(500, terminal_signal=0.004)
    v_hat, x_t = _seeded(4, 3, 16, 16), _seeded(4, 3, 16, 16, seed=1)
    t = torch.tensor([5, 100, 300, 500])
    z, s, u = ddpm_to_flow(v_hat, x_t, t, sched)
    ab = sched.ab_t[t].view(-1, 1, 1, 1)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    v_as_eps = v_hat - (x_t - sigma * v_hat) / alpha  # the output read as if it were the noise
    mistakes = [
        ("The flow time is not t / T: s = sigma / (alpha + sigma), with alpha = sqrt(ab_t), sigma = sqrt(1 - ab_t).",
         (z, t.float() / sched.T, u)),
        ("Rescale the state too: z = x_t / (alpha + sigma) lies on the straight path, x_t itself does not.",
         (x_t, s, u)),
        ("eps and x0 are swapped: the velocity is eps - x0 (noise minus image); check which of your two "
         "estimates is the noise.", (z, s, -u)),
        ("The shipped model predicts v, not the noise: recover eps = alpha v + sigma x_t and "
         "x0 = alpha x_t - sigma v first.", (z, s, v_as_eps)),
    ]
    return _judge("ddpm_to_flow", fn, lambda f: f(v_hat, x_t, t, sched), (z, s, u), mistakes, ddpm_to_flow,
                  shape_hint="Shape ab_t[t] to (B, 1, 1, 1) for the images, and return s with shape (B,).")


# -- notebook 9 -------------------------------------------------------------------------------------

def _tiny_teacher():
    """A small seeded v-predicting ContextUnet on the shipped schedule: fast, and not the identity."""
    with torch.random.fork_rng(devices=[]):  # the learner's CPU random numbers stay put (and CUDA untouched)
        torch.manual_seed(0)
        model = du.ContextUnet(n_feat=16, prediction="v").eval()
    return model, du.make_schedule(500, terminal_signal=0.004)


def _solve_x(z_end, x_t, ab, ab_end):
    """The clean image that makes one DDIM step from x_t (where ab = alpha-bar) land on z_end (at ab_end)."""
    ratio = ((1 - ab_end) / (1 - ab)).sqrt()
    return (z_end - ratio * x_t) / (ab_end.sqrt() - ratio * ab.sqrt())


def distillation_pair(teacher, x0, noise, t, t_mid, t_next, schedule, context, guide_w):
    """The course's answer: the student's input x_t (x0 noised once to step t) and its target, the clean image
    that makes one DDIM step t -> t_next land where the teacher's two steps t -> t_mid -> t_next land."""
    x_t = du.perturb_input(x0, t, noise, schedule)
    return x_t, du.distillation_target(teacher, x_t, t, t_mid, t_next, schedule, context=context, guide_w=guide_w)


def check_distillation_pair(fn):
    """fn(teacher, x0, noise, t, t_mid, t_next, schedule, context, guide_w) -> (x_t, x_tilde); int steps."""
    teacher, sched = _tiny_teacher()
    x0, noise = _seeded(4, 3, 16, 16).clamp(-1, 1), _seeded(4, 3, 16, 16, seed=1)
    context, w, (t, t_mid, t_next) = du.one_hot(torch.tensor([0, 1, 2, 3])), 2.0, (375, 312, 250)
    ab = lambda step: sched.ab_t[step]  # noqa: E731
    eps_at = lambda x, step: du.predict_noise(teacher, x, step, sched, context, w)  # noqa: E731
    with torch.no_grad():
        x_t, want = distillation_pair(teacher, x0, noise, t, t_mid, t_next, sched, context, w)
        z_mid = du.denoise_ddim(x_t, t, t_mid, eps_at(x_t, t), sched)
        z_next = du.denoise_ddim(z_mid, t_mid, t_next, eps_at(z_mid, t_mid), sched)
        one_step = du.predict_x0(x_t, t, eps_at(x_t, t), sched)  # = solving after the teacher's first step
        stale = du.denoise_ddim(z_mid, t_mid, t_next, eps_at(z_mid, t), sched)  # 2nd call told the wrong time
        twice = du.perturb_input(x_t, t, noise, sched)
        twice_target = du.distillation_target(teacher, twice, t, t_mid, t_next, sched, context=context, guide_w=w)
    mistakes = [
        ("That is the teacher's ONE-step guess (its x0 estimate at x_t): the target must come from two teacher "
         "steps, t -> t_mid -> t_next, so that one student step can stand for both.", (x_t, one_step)),
        ("Wrong time in the solve: one student step goes from t to t_next, so use alpha and sigma at t_next "
         "(not t_mid) with the teacher's z at t_next.", (x_t, _solve_x(z_next, x_t, ab(t), ab(t_mid)))),
        ("The teacher's second call was told the wrong time: it starts at t_mid, so ask the network at t_mid.",
         (x_t, _solve_x(stale, x_t, ab(t), ab(t_next)))),
        ("The student's input is noised twice: perturb_input takes the CLEAN image x0 once; the teacher and the "
         "student both start from that x_t.", (twice, twice_target)),
        ("The teacher started from an input noised twice: give it the same x_t the student sees.",
         (x_t, twice_target)),
    ]
    return _judge("distillation_pair", fn, lambda f: f(teacher, x0, noise, t, t_mid, t_next, sched, context, w),
                  (x_t, want), mistakes, distillation_pair, atol=1e-4)


def student_v_target(x_tilde, x_t, noise, t, schedule):
    """The course's answer: the v a network should output at x_t for the clean image x_tilde."""
    ab = schedule.ab_t[t]
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    eps_tilde = (x_t - alpha * x_tilde) / sigma  # the noise that x_tilde implies, not the noise drawn
    return alpha * eps_tilde - sigma * x_tilde


def check_student_v_target(fn):
    """fn(x_tilde, x_t, noise, t, schedule) -> v (B, C, H, W); t an int step."""
    sched = du.make_schedule(500, terminal_signal=0.004)
    x0, noise, x_tilde = _seeded(4, 3, 16, 16).clamp(-1, 1), _seeded(4, 3, 16, 16, seed=1), _seeded(4, 3, 16, 16, seed=2)
    t = 312
    x_t = du.perturb_input(x0, t, noise, sched)
    want = student_v_target(x_tilde, x_t, noise, t, sched)
    alpha, sigma = sched.ab_t[t].sqrt(), (1 - sched.ab_t[t]).sqrt()
    eps_tilde = (x_t - alpha * x_tilde) / sigma
    mistakes = [
        ("That uses the noise you drew. The target's noise is the one x_tilde implies at x_t, "
         "eps_tilde = (x_t - alpha x_tilde) / sigma: the teacher's two steps decide it, not the draw.",
         alpha * noise - sigma * x_tilde),
        ("The sign is flipped: v = alpha eps - sigma x0.", sigma * x_tilde - alpha * eps_tilde),
        ("alpha and sigma are swapped: alpha = sqrt(ab_t) weighs the noise in v, sigma = sqrt(1 - ab_t) the image.",
         sigma * eps_tilde - alpha * x_tilde),
    ]
    return _judge("student_v_target", fn, lambda f: f(x_tilde, x_t, noise, t, sched), want, mistakes, student_v_target)
