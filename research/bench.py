"""Benchmark: training and sampling speed of the course, against the original course's recipe and the CPU's peak.

    python -m research.bench            # full run, a few minutes; writes research/results.json
    python -m research.bench --quick    # under a minute, fewer repeats (DDPM-500 time extrapolated)

(from the repository root)

What it measures, all in one process on one machine (interleaved, repeated, medians):
  * training throughput (forward + MSE + backward + Adam step, batch 100, 16x16, n_feat 64) of our
    training step (channels_last + bf16 autocast where the CPU has native bf16) and of a faithful
    re-implementation of the original course's recipe (fp32, NCHW, and its ResidualConvBlock that builds a
    new 1x1 shortcut conv on every forward pass);
  * the machine's practical peak: a large 3x3 convolution and a 2048^3 matrix product, fp32 and bf16,
    and the fraction of it our training step reaches (FLOPs counted from the layers: 3x forward);
  * sampling 32 images: DDPM with 500 steps and DDIM with 25, ours and a course-style loop;
  * peak memory (resident set size) of training (batch 100) and of sampling (32 images, DDIM-25), each in a
    fresh subprocess, beside that of a process that only imports torch and the module.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusion_utilities as du
from course_tools.hardware import describe_device, fast_settings, use_fast_settings

ROOT = Path(__file__).resolve().parents[1]

BATCH, N_FEAT, H = 100, 64, 16


# ---- the original course's model and loops, re-implemented faithfully for timing ---------------------

class CourseResidualConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels, is_res=False):
        super().__init__()
        self.same_channels = in_channels == out_channels
        self.is_res = is_res
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.GELU())

    def forward(self, x):
        if self.is_res:
            x1 = self.conv1(x)
            x2 = self.conv2(x1)
            if self.same_channels:
                out = x + x2
            else:  # the course's bug: a new, random, untrained layer on every call
                shortcut = nn.Conv2d(x.shape[1], x2.shape[1], kernel_size=1, stride=1, padding=0).to(x.device)
                out = shortcut(x) + x2
            return out / 1.414
        return self.conv2(self.conv1(x))


class CourseUnetUp(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.model = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
                                   CourseResidualConvBlock(out_channels, out_channels),
                                   CourseResidualConvBlock(out_channels, out_channels))

    def forward(self, x, skip):
        return self.model(torch.cat((x, skip), 1))


class CourseUnetDown(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.model = nn.Sequential(CourseResidualConvBlock(in_channels, out_channels),
                                   CourseResidualConvBlock(out_channels, out_channels), nn.MaxPool2d(2))

    def forward(self, x):
        return self.model(x)


class CourseEmbedFC(nn.Module):
    def __init__(self, input_dim, emb_dim):
        super().__init__()
        self.input_dim = input_dim
        self.model = nn.Sequential(nn.Linear(input_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, x):
        return self.model(x.view(-1, self.input_dim))


class CourseContextUnet(nn.Module):
    def __init__(self, in_channels=3, n_feat=64, n_cfeat=5, height=16):
        super().__init__()
        self.in_channels, self.n_feat, self.n_cfeat, self.height = in_channels, n_feat, n_cfeat, height
        self.init_conv = CourseResidualConvBlock(in_channels, n_feat, is_res=True)
        self.down1 = CourseUnetDown(n_feat, n_feat)
        self.down2 = CourseUnetDown(n_feat, 2 * n_feat)
        self.to_vec = nn.Sequential(nn.AvgPool2d(4), nn.GELU())
        self.timeembed1 = CourseEmbedFC(1, 2 * n_feat)
        self.timeembed2 = CourseEmbedFC(1, n_feat)
        self.contextembed1 = CourseEmbedFC(n_cfeat, 2 * n_feat)
        self.contextembed2 = CourseEmbedFC(n_cfeat, n_feat)
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, height // 4, height // 4),
                                 nn.GroupNorm(8, 2 * n_feat), nn.ReLU())
        self.up1 = CourseUnetUp(4 * n_feat, n_feat)
        self.up2 = CourseUnetUp(2 * n_feat, n_feat)
        self.out = nn.Sequential(nn.Conv2d(2 * n_feat, n_feat, 3, 1, 1), nn.GroupNorm(8, n_feat), nn.ReLU(),
                                 nn.Conv2d(n_feat, in_channels, 3, 1, 1))

    def forward(self, x, t, c=None):
        x = self.init_conv(x)
        down1 = self.down1(x)
        down2 = self.down2(down1)
        hiddenvec = self.to_vec(down2)
        if c is None:
            c = torch.zeros(x.shape[0], self.n_cfeat).to(x)
        cemb1 = self.contextembed1(c).view(-1, self.n_feat * 2, 1, 1)
        temb1 = self.timeembed1(t).view(-1, self.n_feat * 2, 1, 1)
        cemb2 = self.contextembed2(c).view(-1, self.n_feat, 1, 1)
        temb2 = self.timeembed2(t).view(-1, self.n_feat, 1, 1)
        up1 = self.up0(hiddenvec)
        up2 = self.up1(cemb1 * up1 + temb1, down2)
        up3 = self.up2(cemb2 * up2 + temb2, down1)
        return self.out(torch.cat((up3, x), 1))


def course_train_step(model, optim, x, c, ab_t, T):
    """The course's L3 loop body: fp32, NCHW, (1 - ab_t) noising as it shipped, context dropout 0.1."""
    optim.zero_grad()
    noise = torch.randn_like(x)
    t = torch.randint(1, T + 1, (x.shape[0],))
    x_pert = ab_t.sqrt()[t, None, None, None] * x + (1 - ab_t[t, None, None, None]) * noise
    c = c * torch.bernoulli(torch.zeros(x.shape[0]) + 0.9).unsqueeze(-1)
    loss = F.mse_loss(model(x_pert, t / T, c=c), noise)
    loss.backward()
    optim.step()


@torch.no_grad()
def course_sample(model, n_sample, schedule, n_ddim=None):
    """The course's sample_ddpm / sample_ddim loops (frames stored as numpy at its save points)."""
    T, (b_t, a_t, ab_t) = schedule.T, (schedule.b_t, schedule.a_t, schedule.ab_t)
    samples = torch.randn(n_sample, 3, H, H)
    intermediate = []
    if n_ddim is None:
        for i in range(T, 0, -1):
            t = torch.tensor([i / T])[:, None, None, None]
            z = torch.randn_like(samples) if i > 1 else 0
            eps = model(samples, t)
            noise = b_t.sqrt()[i] * z
            samples = (samples - eps * ((1 - a_t[i]) / (1 - ab_t[i]).sqrt())) / a_t[i].sqrt() + noise
            if i % 20 == 0 or i == T or i < 8:
                intermediate.append(samples.detach().cpu().numpy())
    else:
        step = T // n_ddim
        for i in range(T, 0, -step):
            t = torch.tensor([i / T])[:, None, None, None]
            eps = model(samples, t)
            ab, ab_prev = ab_t[i], ab_t[i - step]
            samples = ab_prev.sqrt() / ab.sqrt() * (samples - (1 - ab).sqrt() * eps) + (1 - ab_prev).sqrt() * eps
            intermediate.append(samples.detach().cpu().numpy())
    return samples, intermediate


# ---- measurement helpers ------------------------------------------------------------------------------

def forward_macs(model, x, t, c):
    """Multiply-accumulates of one forward pass, counted from conv, transposed-conv and linear layers."""
    macs = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            macs[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.ConvTranspose2d):
            macs[0] += inp[0].numel() * mod.out_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            macs[0] += out.numel() * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    with torch.no_grad():
        model(x, t, c)
    for h in hooks:
        h.remove()
    return macs[0]


def time_it(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def peak_gflops(repeats):
    """Best-of-repeats GFLOP/s of a large 3x3 conv and a 2048^3 matmul, fp32 and bf16."""
    res = {}
    x = torch.randn(32, 256, 32, 32)
    w = torch.randn(256, 256, 3, 3)
    conv_flops = 2 * 32 * 256 * 32 * 32 * 256 * 9
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_flops = 2 * 2048 ** 3
    for dtype in (torch.float32, torch.bfloat16):
        xs, ws, as_, bs = x.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype)
        F.conv2d(xs, ws, padding=1)  # warm-up
        name = "fp32" if dtype == torch.float32 else "bf16"
        res[f"conv_{name}"] = conv_flops / min(time_it(lambda: F.conv2d(xs, ws, padding=1), repeats)) / 1e9
        as_ @ bs
        res[f"matmul_{name}"] = mm_flops / min(time_it(lambda: as_ @ bs, repeats)) / 1e9
    return res


def memory_child(what):
    """Run in a fresh process: train a few steps or sample, print the peak resident set in MB."""
    torch.manual_seed(0)
    schedule = du.make_schedule(500)
    if what == "train":
        model = du.ContextUnet(n_feat=N_FEAT)
        fmt = use_fast_settings(model, "cpu")  # bf16 autocast and channels_last where the CPU has native bf16
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x = torch.randn(BATCH, 3, H, H).contiguous(memory_format=fmt)
        c = du.one_hot(torch.randint(0, 5, (BATCH,)))
        for _ in range(3):
            du.train_step(model, opt, x, c, schedule)
    elif what == "sample":
        model = du.ContextUnet(n_feat=N_FEAT).eval()
        model.autocast_dtype = fast_settings("cpu")[0]
        du.sample_ddim(model, 32, schedule, n_steps=25)
    print(peak_rss_mb())


def peak_rss_mb():
    """This process's peak resident set in MB. /proc's VmHWM is per process image; ru_maxrss on Linux
    carries the parent's peak across fork and exec, so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(what):
    out = subprocess.run([sys.executable, "-m", "research.bench", "--memory-child", what], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


# ---- the benchmark ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats; DDPM-500 extrapolated from 50 steps")
    ap.add_argument("--out", default=str(ROOT / "research" / "results.json"))
    ap.add_argument("--memory-child", choices=["train", "sample", "import"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)

    rounds, steps_per_round = (2, 3) if args.quick else (5, 8)
    torch.manual_seed(0)
    schedule = du.make_schedule(500)
    amp, fmt = fast_settings("cpu")
    print(f"machine: {describe_device('cpu')}; torch {torch.__version__}; "
          f"our settings: autocast {amp}, {'channels_last' if fmt == torch.channels_last else 'NCHW'}")

    # Training: ours and the course's, interleaved so drifts in machine speed hit both alike.
    ours = du.ContextUnet(n_feat=N_FEAT)
    use_fast_settings(ours, "cpu")  # autocast `amp` and memory format `fmt`
    ours_opt = torch.optim.Adam(ours.parameters(), 1e-3)
    course = CourseContextUnet(n_feat=N_FEAT)
    course_opt = torch.optim.Adam(course.parameters(), 1e-3)
    x = torch.rand(BATCH, 3, H, H) * 2 - 1
    c = du.one_hot(torch.randint(0, 5, (BATCH,)))
    x_fast = x.contiguous(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    ours_step = lambda: du.train_step(ours, ours_opt, x_fast, c, schedule, generator=gen)  # noqa: E731
    course_step = lambda: course_train_step(course, course_opt, x, c, schedule.ab_t, schedule.T)  # noqa: E731
    ours_step(), course_step()  # warm-up
    ours_rates, course_rates = [], []
    for _ in range(rounds):
        ours_rates.append(BATCH * steps_per_round / sum(time_it(ours_step, steps_per_round)))
        course_rates.append(BATCH * steps_per_round / sum(time_it(course_step, steps_per_round)))
    train_rate, course_rate = statistics.median(ours_rates), statistics.median(course_rates)

    macs = forward_macs(du.ContextUnet(n_feat=N_FEAT).eval(), x[:1], torch.tensor([0.5]), c[:1])
    train_flops_per_sample = 3 * 2 * macs
    peaks = peak_gflops(2 if args.quick else 5)
    achieved = train_rate * train_flops_per_sample / 1e9
    ceiling = peaks["conv_bf16"] if amp == torch.bfloat16 else peaks["conv_fp32"]

    # Sampling 32 images.
    n = 32
    ours.eval()
    ours_sampler = du.ContextUnet(n_feat=N_FEAT).eval()
    ours_sampler.autocast_dtype = amp  # sampled under bf16 autocast where the CPU has it (NCHW, as before)
    course.eval()
    reps = 1 if args.quick else 3
    ddim_ours = statistics.median(time_it(lambda: du.sample_ddim(ours_sampler, n, schedule, n_steps=25), reps))
    ddim_course = statistics.median(time_it(lambda: course_sample(course, n, schedule, n_ddim=25), reps))
    if args.quick:  # time 50 of the 500 steps and scale up
        short = du.make_schedule(50)
        ddpm_ours = 10 * min(time_it(lambda: du.sample_ddpm(ours_sampler, n, short), 1))
        ddpm_course = 10 * min(time_it(lambda: course_sample(course, n, short), 1))
    else:
        ddpm_ours = min(time_it(lambda: du.sample_ddpm(ours_sampler, n, schedule), 1))
        ddpm_course = min(time_it(lambda: course_sample(course, n, schedule), 1))

    res = {
        "machine": describe_device("cpu"), "torch": torch.__version__, "quick": args.quick,
        "settings": {"autocast": str(amp), "channels_last": fmt == torch.channels_last,
                     "threads": torch.get_num_threads()},
        "train_samples_per_s": train_rate, "course_train_samples_per_s": course_rate,
        "train_speedup_vs_course": train_rate / course_rate,
        "train_rounds": {"ours": ours_rates, "course": course_rates},
        "train_gflop_per_sample": train_flops_per_sample / 1e9, "train_gflops": achieved,
        "peak_gflops": peaks, "peak_fraction": achieved / ceiling,
        "peak_reference": "conv_bf16" if amp == torch.bfloat16 else "conv_fp32",
        "ddpm500_s": ddpm_ours, "ddim25_s": ddim_ours, "ddim_speedup": ddpm_ours / ddim_ours,
        "course_ddpm500_s": ddpm_course, "course_ddim25_s": ddim_course,
        "ddpm500_extrapolated": args.quick,
        "peak_rss_mb": {"train": measure_memory("train"), "sample": measure_memory("sample"),
                        "import_only": measure_memory("import")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")

    rows = [
        ("training, ours (samples/s)", f"{train_rate:.0f}"),
        ("training, original course recipe (samples/s)", f"{course_rate:.0f}"),
        ("training speed-up vs course", f"{train_rate / course_rate:.2f}x"),
        ("training GFLOP/s (3x forward FLOPs)", f"{achieved:.0f}"),
        ("peak conv fp32 / bf16 (GFLOP/s)", f"{peaks['conv_fp32']:.0f} / {peaks['conv_bf16']:.0f}"),
        ("peak matmul fp32 / bf16 (GFLOP/s)", f"{peaks['matmul_fp32']:.0f} / {peaks['matmul_bf16']:.0f}"),
        (f"fraction of the {res['peak_reference']} peak", f"{res['peak_fraction']:.0%}"),
        ("DDPM-500, 32 samples, ours / course (s)", f"{ddpm_ours:.1f} / {ddpm_course:.1f}"
         + (" (extrapolated)" if args.quick else "")),
        ("DDIM-25, 32 samples, ours / course (s)", f"{ddim_ours:.2f} / {ddim_course:.2f}"),
        ("DDIM-25 speed-up over DDPM-500", f"{ddpm_ours / ddim_ours:.1f}x"),
        ("peak memory, training / sampling / just importing torch (MB RSS)",
         f"{res['peak_rss_mb']['train']:.0f} / {res['peak_rss_mb']['sample']:.0f} / {res['peak_rss_mb']['import_only']:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
