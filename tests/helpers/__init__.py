"""What several test files share: tiny configs and shards (data), tiny models and batches (model_kit),
a local SLURM cluster (slurm_cluster), the img2dataset venv (img2dataset_venv), reading the README and
docs as commands, links and a folder map (docs). No tests here."""
