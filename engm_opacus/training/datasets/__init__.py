"""The dataset readers behind :mod:`engm_opacus.training.data`, one module per dataset (use ``load_dataset`` there).

* :mod:`~engm_opacus.training.datasets.common`: the ``DataSplits`` record, the seeded
  train/validation hold-out and the per-split transform view they share;
* :mod:`~engm_opacus.training.datasets.digits`: the embedded scikit-learn digits;
* :mod:`~engm_opacus.training.datasets.cifar`: CIFAR-10 / CIFAR-100 (torchvision's readers);
* :mod:`~engm_opacus.training.datasets.tinyimagenet`: TinyImageNet (torchvision's ``ImageFolder``).
"""
