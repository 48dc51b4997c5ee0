"""Signed completion notifications of jobs (Standard Webhooks), from a durable outbox."""
