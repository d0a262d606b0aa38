"""Tooling around the course that no lesson reads: quality metrics, the weights manifest and the command line.

    course_tools.metrics   SpriteClassifier, sprite-FID / KID, memorisation, the evaluation tables
    course_tools.manifest  weights/manifest.json: sha256, how each file was made, its headline numbers
    course_tools.dataset   your own images as a dataset (make-dataset)
    course_tools.runs      a training run's plumbing: atomic saves, lock, checkpoints and resume, torchrun processes
    course_tools.cli       `python diffusion_utilities.py train|sample|export|train-classifier|evaluate|make-dataset`
    course_tools.colab     the notebooks' Colab setup: install only the requirements Colab lacks

It imports diffusion_utilities (the course) and is never imported by it, except lazily by
`load_pretrained`, which reads the manifest, and `train`, which needs the run plumbing.
"""
