"""The HTTP API: OpenAI's fine-tuning wire format over the database, the object storage and the task queue."""
