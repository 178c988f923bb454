"""One training run: the loop (loop: baseline, sparse_kd, default_kd), its optimizer and precision
(optim), its per-epoch checkpoints (checkpoint), `python -m rekd.train` (__main__) and `python -m
rekd.export`, a trained student written out dense or sparse (export). Imports neither Ray
nor MLflow: a trial, a final run and a reproduction all call `rekd.train.loop.train` and report what it
returns through their own tracking."""
