"""tune: Ray Tune sweeps over samplers, combiners and hyperparameters, each trial a real
distributed training run recorded in MLflow. Not built yet: see issue 7."""
