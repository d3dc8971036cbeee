"""tune: Ray Tune sweeps over samplers, combiners and hyperparameters.

`space` reads and checks a sweep YAML (configs/tune/) before Ray starts; `trial` runs one trial
as a real `deepspeed launch/train.py` job (the same code path users launch by hand) and forwards
its validation recall to Tune; `sweep` starts Ray, runs the Tuner with ASHA, and records the
sweep in MLflow as a parent run with one child run per trial.
"""
