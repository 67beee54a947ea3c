"""The evaluation library the kNN, linear, semi-supervised and transfer jobs are built from."""
