"""mscn.train.eval: the evaluation protocols of the paper (App. A.2-A.4) and their CLI.

- ``linear``: linear probe on frozen features (A.2); ``mscn eval transfer`` is the
  same probe on another dataset (Table 3).
- ``knn``: weighted kNN on frozen features (InstDisc / DINO).
- ``finetune``: semi-supervised fine-tuning on a 1 % / 10 % label subset (A.3).
- ``export``: the backbone for detection transfer (A.4).
- ``results`` / ``figures``: result files and tables, paper-style figures.
- ``pretrained``: checkpoint -> backbone + config; ``common``: what the protocols share.
- ``cli``: ``mscn eval ...``.
"""
