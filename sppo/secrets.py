"""What counts as a secret, defined once: the environment variables `ray_jobs/submit.py` passes
to a job as secrets (their values masked wherever it prints), and the config keys and values
`sppo.tracking` keeps out of MLflow.
"""

from __future__ import annotations

import re
from typing import Any

# Exact names of credentials a run may need: hub downloads, an MLflow server behind auth.
CREDENTIAL_NAMES = frozenset({
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
})
# S3 / MinIO: every AWS_* variable travels with the credentials (a region or endpoint included).
CREDENTIAL_PREFIXES = ("AWS_",)
# A name holding one of these words: "hub_token", "OPENAI_API_KEY", "aws.secret_access_key". Whole
# words only, so that "sampling.max_tokens" and "TOKENIZERS_PARALLELISM" are not secrets.
_SECRET_WORD = re.compile(r"(?<![a-z])(token|secret|passw(or)?d|api[_-]?key|credentials?|private[_-]?key)(?![a-z])",
                          re.IGNORECASE)
# user:password@ in a URL (e.g. a tracking URI behind basic auth).
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*):[^@/\s]*@", re.IGNORECASE)
MASK = "***"


# Where a secret lies, not the secret itself: "RAY_AUTH_TOKEN_PATH".
_LOCATION_SUFFIXES = ("_PATH", "_FILE", "_DIR")


def is_secret(name: str) -> bool:
    """Whether an environment variable or a config key names a secret."""
    if name.upper().endswith(_LOCATION_SUFFIXES):
        return False
    return passed_to_jobs(name) or bool(_SECRET_WORD.search(name))


def passed_to_jobs(name: str) -> bool:
    """The secrets a job submission takes from the caller's environment unasked: the credentials
    a run may need (hub, S3, MLflow) and any *_API_KEY. Other secrets (a GITHUB_TOKEN, say) stay
    on the caller's machine unless named with `--secret`."""
    return name in CREDENTIAL_NAMES or name.startswith(CREDENTIAL_PREFIXES) or name.endswith("_API_KEY")


def redact(key: str, value: Any) -> str:
    """`value` as it may be shown or stored: masked whole if `key` names a secret, else with any
    URL password masked."""
    if is_secret(key):
        return MASK
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", str(value))
