"""Make .ci/colab_like's throwaway venv: `python .ci/host_venv.py VENV_DIR [--without-pip]`.

The venv must see every package the running `python` sees (torch, nbval, ...), with its own site-packages
first, so that the ipywidgets 7.7.1 colab_like installs into it shadows the environment's ipywidgets 8.
`python -m venv --system-site-packages` does not do this when `python` is itself a venv: the new venv is
built on the base interpreter and reaches only the base interpreter's packages (on a fresh clone installed
into a venv: "No module named 'torch'"). This works the same from a plain interpreter, a venv or a conda env.

So the venv is made without system site packages, and one .pth file in its site-packages adds, after that
site-packages, every directory that the running python's site module put on its sys.path (its site-packages
or dist-packages, the user site, what their .pth files add; not the standard library, not the working
folder). Each is added with site.addsitedir, which also runs the .pth files inside it (editable installs).
"""
import argparse
import os
import subprocess
import sys
import venv

PTH_NAME = "active-environment.pth"  # the file this writes into the new venv's site-packages
PRINT_PATH = ["-c", "import sys; print('\\n'.join(sys.path))"]


def site_dirs(python=sys.executable):
    """The entries of `python`'s sys.path that its site module added: sys.path less sys.path under -S."""
    full, bare = (subprocess.run([python, *flags, *PRINT_PATH], check=True, capture_output=True, text=True)
                  .stdout.splitlines() for flags in ([], ["-S"]))
    return [d for d in full if d not in bare]


class HostVenv(venv.EnvBuilder):
    def post_setup(self, context):
        purelib = subprocess.run([context.env_exec_cmd, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        lines = [f"import site; site.addsitedir({d!r})\n" for d in site_dirs()]
        with open(os.path.join(purelib, PTH_NAME), "w") as pth:
            pth.writelines(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv_dir")
    parser.add_argument("--without-pip", action="store_true", help="skip ensurepip (the tests use this)")
    args = parser.parse_args()
    HostVenv(with_pip=not args.without_pip).create(args.venv_dir)
