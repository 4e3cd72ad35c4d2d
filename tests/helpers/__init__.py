"""What several test files share: tiny configs and shards (data), tiny models and batches (model_kit),
a local SLURM cluster (slurm_cluster), the img2dataset venv (img2dataset_venv). No tests here."""
