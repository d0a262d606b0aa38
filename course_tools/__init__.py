"""The machinery around the course: it imports diffusion_utilities (the lesson) and is never imported by it,
except by the module's `if __name__ == "__main__"` entry, which runs the command line.

    course_tools.training   the trainer behind `train` (TrainConfig, run_training) and notebook 3's plan_steps
    course_tools.runs       a run's plumbing: atomic writes, lock, checkpoints and resume, torchrun processes
    course_tools.hardware   the device's description and the precision that trains fastest on it (bf16)
    course_tools.metrics    the judging SpriteClassifier, sprite-FID / KID, memorisation, the evaluation tables
    course_tools.manifest   weights/manifest.json: sha256, how each file was made, its headline numbers
    course_tools.pictures   PNG grids and GIFs for the command line
    course_tools.dataset    your own images as a dataset (make-dataset)
    course_tools.exercises  the notebooks' exercise checkers
    course_tools.health     notebook 3's "is my run healthy?": the loss per noise level against the course's runs
    course_tools.colab      the notebooks' Colab setup: install only the requirements Colab lacks
    course_tools.cli        `python diffusion_utilities.py train|sample|export|train-classifier|evaluate|make-dataset`

Names the notebooks may use: metrics.load_classifier and metrics.classifier_outputs (the judge),
metrics.frechet_distance and metrics.real_split (sprite-FID's floor), manifest.read_manifest,
training.plan_steps, hardware.use_fast_settings and health.check_run_health (notebook 3), the exercises'
check_* functions, colab.install_missing (the setup cell).
"""
