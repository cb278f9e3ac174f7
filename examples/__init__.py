"""Example pipelines and worker tasks that `make dev` loads."""
