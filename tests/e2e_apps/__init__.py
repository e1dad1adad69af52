"""Importable Celery apps and workflows for the end-to-end tests' subprocess workers."""
