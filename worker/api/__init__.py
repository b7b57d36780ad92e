"""The HTTP API: a thin door onto worker.service, as the CLI is."""
