"""Shared by the API and the workers: settings, database models, the job state machine, object storage."""
