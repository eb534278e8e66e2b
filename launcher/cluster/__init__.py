"""Running on clusters: SLURM launches (`slurm`) and stop signals, saving and requeueing (`preemption`)."""
