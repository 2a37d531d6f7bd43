"""retrain_gate component: core.run (no KFP) and component.py (KFP wrapper)."""
