"""Queue quotas: reservations per user and instance, their stores, guard and reconciler."""
