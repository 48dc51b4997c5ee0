"""Tests of the deployment files in deploy/ (no Docker engine or cluster runs here)."""
