"""Downstream evaluation: benchmark tasks scored the way lm-evaluation-harness scores them."""
