"""mscn: Masked Siamese ConvNets with a GPU input pipeline (DALI + Triton masks).

Sub-packages (installed from the repo-root folders by ``package_dir`` in setup.py):

- ``mscn.pipelines``    DALI pipelines: decode -> views -> high-pass (pipelines/)
- ``mscn.cuda_kernels`` mask kernels and their torch references (cuda_kernels/)
- ``mscn.train``        models, losses, LARS, the Runtime and the pretraining loop (train/)
- ``mscn.train.eval``   the evaluation protocols and ``mscn eval`` (train/eval/)

The core (this package, ``mscn.data``, ``mscn.configs``) imports no stage; see
tests/test_layering.py.
"""

__version__ = "0.1.0"
