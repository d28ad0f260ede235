"""Development tooling, kept apart from the algorithm: the local Ray head + MLflow server that
`make demo` and the tests start (`localstack`), and the fault-injection points the crash-safety
tests use (`faults`). Nothing in a real run depends on them; a kill point does nothing unless
its variable is set."""
