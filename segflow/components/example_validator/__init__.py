"""example_validator component: core.run (no KFP) and component.py (KFP wrapper)."""
