"""The evaluation library the kNN, linear, semi-supervised and transfer jobs are built from.

  job.py         an evaluation job's scaffold: workdir checks, backbone, mesh, results.json
  backbone.py    the backbone of a pretraining checkpoint or of a torchvision/timm state
                 dict file (architecture inferred), or its random-init baseline
  knn.py         the weighted kNN classifier (the pretraining monitor's and the kNN job's)
  features.py    frozen features of a batch or of a whole split; batches of feature arrays
  classifier.py  the linear head: train step, torch SGD, per-epoch cosine, loop, accuracies
  probes.py      full-batch logistic regression on features (transfer)
  svm.py         VOC07's per-class linear SVMs as VISSL runs them (scikit-learn), its AP
  protocols.py   the official evaluate.py recipes: train_head, finetune

It imports core modules, bt_jax.data and bt_jax.models, never a job. Nothing is imported
here: the pretraining job loads evaluation.knn without the scaffold.
"""
