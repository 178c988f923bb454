"""`python -m rekd.search STUDY` (__main__): a study (study) becomes a checked plan (plan); the driver
(driver) runs it as one Ray Tune experiment: trials (trainable) sampled by Optuna (optuna_searcher), stopped
early by ASHA (asha), tracked in MLflow (rekd.tracking.tune_callback), summarized at the end (report) in the
one order every command ranks trials by (ranking). Searches of several objectives: dominance, fronts and
hypervolume (pareto), MO-ASHA (moasha) and the front a search records (front). The search's folder (state),
its Ray (ray_session), its trials' storage (trial_storage) and a watch on its writability (storage_watch),
interruption (interrupt), the live table (progress) and `python -m rekd.unsent` (unsent) live here too."""
