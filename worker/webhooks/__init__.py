"""Completion notifications: signed webhooks and Celery callbacks, sent from an outbox in SQL."""
