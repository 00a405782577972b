"""Where the kernels (`kernels.py`) change strategy, importable without torch: the
planner (`plan/compute.py`) counts a run's FLOPs by the same thresholds."""

# Eagerly on a CPU in bf16, attention's backward remakes each group of heads' whole scores
# up to this length (the planner counts its extra FLOPs); past it the flash backward wins.
EAGER_GROUPED_MAX_SEQ = 512
