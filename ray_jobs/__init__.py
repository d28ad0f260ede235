"""Submitting SPPO runs as Ray jobs: `python -m ray_jobs.submit` and `runtime_env.yaml`."""
