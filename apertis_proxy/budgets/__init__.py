"""Budgets: quotas that reset per period and the alerts they raise."""
