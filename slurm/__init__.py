"""SLURM: sbatch templates, cluster profiles, submission, requeue/resume, status."""
