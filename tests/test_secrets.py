"""One definition of a secret (`sppo.secrets`), for what a job submission passes and masks and
for what MLflow never receives."""

from __future__ import annotations

from sppo.secrets import MASK, is_secret, passed_to_jobs, redact


def test_secrets_are_credential_names_cloud_variables_and_names_with_a_secret_word():
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_USERNAME", "OPENAI_API_KEY", "SPPO_TEST_API_KEY", "GITHUB_TOKEN", "DB_PASSWORD",
                 "hub_token", "aws.secret_access_key", "judge.api-key", "x.private_key", "GCP_CREDENTIALS"):
        assert is_secret(name), name
    # Whole words only: a token count or a tokenizer setting is not a secret, nor a secret's location.
    for name in ("PATH", "HOME", "MLFLOW_TRACKING_URI", "HF_HOME", "RAY_ADDRESS", "sampling.max_tokens",
                 "TOKENIZERS_PARALLELISM", "train.learning_rate", "RAY_AUTH_TOKEN_PATH", "HF_TOKEN_FILE"):
        assert not is_secret(name), name


def test_jobs_are_passed_the_credentials_a_run_needs_and_no_other_secret_unasked():
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_REGION", "MLFLOW_TRACKING_TOKEN",
                 "OPENAI_API_KEY"):
        assert passed_to_jobs(name) and is_secret(name), name
    for name in ("GITHUB_TOKEN", "DB_PASSWORD", "PATH", "HF_HOME"):
        assert not passed_to_jobs(name), name


def test_redact_masks_secrets_by_name_and_passwords_in_urls():
    assert redact("hub_token", "hf_abc") == MASK
    assert redact("tracking.tracking_uri", "https://alice:s3cr3t@mlflow.example.com/x") == \
        f"https://alice:{MASK}@mlflow.example.com/x"
    assert redact("sampling.max_tokens", 2048) == "2048"  # was masked before the whole-word rule
