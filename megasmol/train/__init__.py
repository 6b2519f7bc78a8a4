"""The training loop and what it is made of: optimizer groups, schedules, loss, metrics."""
